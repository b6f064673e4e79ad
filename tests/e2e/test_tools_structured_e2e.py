"""Structured outputs and tool calls against the real servers of the session (no new server): the default
`smol` (SmolLM2-135M-Instruct, text retrieval on by default, so every chat here also has documents in its
prompt) through the `openai` SDK, LangChain and LlamaIndex; the tiny random model for a forced call that must be
valid whatever the model says, and for `tool_choice: auto`, which the tiny server reads with vLLM's hermes parser
(its configuration names one; the default server names none, so auto is its 400). The parser's cases are in
tests/server/test_tool_choice_auto.py (a fake engine, the real parser and a real tokenizer)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "smol"
# Strings are bounded so a call always closes within max_tokens (a 135M model may ramble inside a string).
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER_PARAMETERS},
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 32}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
PROMPTS = [
    "What's the weather like in Paris today?",
    "Is it raining in Tokyo? Answer in fahrenheit.",
    "Tell me the temperature in Lagos.",
    "weather for the city of Buenos Aires please",
]


class City(BaseModel):
    # Bounded values only: a float is not, and smol at temperature 0 writes "120000000..." until max_tokens.
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    is_capital: bool


@pytest.fixture(scope="module")
def smol(default_client) -> openai.OpenAI:
    return default_client


def test_parse_returns_a_parsed_pydantic_object(smol):
    completion = smol.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe the city of Paris as JSON."}],
        response_format=City,
        max_tokens=200,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, City), choice.message.content


def test_json_object_and_streamed_json_schema_are_valid_json(smol):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 60}, "sure": {"type": "boolean"}},
        "required": ["answer", "sure"],
        "additionalProperties": False,
    }
    stream = smol.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Who first recorded Comet Orrin-7?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
        max_tokens=120,
        temperature=0,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 1
    jsonschema.validate(json.loads("".join(pieces)), schema)
    loose = smol.chat.completions.create(  # any object: its length is the model's (measured: 13 tokens)
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a JSON object with a greeting in it."}],
        response_format={"type": "json_object"},
        max_tokens=300,
        temperature=0,
        extra_body={"retrieval": {"mode": "none"}},
    )
    assert loose.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(loose.choices[0].message.content), dict)


def test_a_forced_named_call_is_valid_for_every_prompt(smol):
    for prompt in PROMPTS:
        response = smol.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=80,
            temperature=0.8,
            seed=7,
        )
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls", (prompt, choice)
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)
        assert response.model_extra["retrieval"]["mode"] == "text"  # documents in, a call out


def test_required_calls_are_valid_and_stream_in_openais_shape(smol):
    schemas = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME["function"]["parameters"]}
    for prompt in PROMPTS[:2]:
        response = smol.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            tools=[WEATHER, TIME],
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=100,
            temperature=0,
        )
        (call,) = response.choices[0].message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    with smol.chat.completions.stream(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPTS[0]}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
        temperature=0,
    ) as stream:
        argument_pieces = [e.arguments_delta for e in stream if e.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()
    assert len(argument_pieces) > 1  # the arguments stream as they are generated
    (call,) = final.choices[0].message.tool_calls
    assert call.function.arguments == "".join(argument_pieces)
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)


def test_auto_and_bad_tools_are_400s_naming_the_field(smol):
    with pytest.raises(openai.BadRequestError) as caught:
        smol.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER])
    assert caught.value.body["param"] == "tool_choice"
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        smol.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=[bad], tool_choice="required"
        )
    assert caught.value.body["param"] == "tools[0].function.parameters"


def test_logit_bias_is_honoured_and_checked_against_the_vocabulary(smol):
    response = smol.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say something."}],
        logit_bias={"330": 100},
        max_tokens=4,
        logprobs=True,
        extra_body={"retrieval": {"mode": "none"}, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.0},
    )
    tokens = [t.token for t in response.choices[0].logprobs.content]
    assert len(tokens) == 4 and len(set(tokens)) == 1, tokens  # +100 on one token: it is every token
    with pytest.raises(openai.BadRequestError) as caught:
        smol.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], logit_bias={"99999999": 5}, max_tokens=2
        )
    assert caught.value.body["param"] == "logit_bias"


def test_completions_echo_scores_the_prompt_and_logit_bias_steers(smol):
    """Legacy completions on the real engine: echo with logprobs gives the prompt's tokens first (vLLM's prompt
    log-probabilities, the first null) in OpenAI's shape; logit_bias is chat's."""
    prompt = "The capital of France is"
    response = smol.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=3, temperature=0)
    (choice,) = response.choices
    logprobs = choice.logprobs
    assert choice.text.startswith(prompt) and "".join(logprobs.tokens) == choice.text
    prompt_tokens = response.usage.prompt_tokens
    assert len(logprobs.tokens) == prompt_tokens + response.usage.completion_tokens
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert all(
        token in top and len(top) in (2, 3)
        for token, top in zip(logprobs.tokens[1:], logprobs.top_logprobs[1:], strict=True)
    )
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    biased = smol.completions.create(model=MODEL, prompt=prompt, logit_bias={"330": 100}, max_tokens=3, logprobs=0)
    assert len(set(biased.choices[0].logprobs.tokens)) == 1, biased.choices[0].logprobs.tokens
    with pytest.raises(openai.BadRequestError) as caught:
        smol.completions.create(model=MODEL, prompt=prompt, logit_bias={"99999999": 5}, max_tokens=2)
    assert caught.value.body["param"] == "logit_bias"


def test_a_forced_call_is_valid_with_the_random_model(client):
    """The tiny random model's output is noise; the constraint alone makes its call valid."""
    for seed in range(3):
        response = client.chat.completions.create(
            model="mmrag-tiny-llava",
            messages=[{"role": "user", "content": "weather?"}],
            tools=[WEATHER, TIME],
            tool_choice="required",
            parallel_tool_calls=False,  # else noise may add calls until its tokens run out
            max_tokens=160,  # the prompt (two tools' schemas) takes 858 of the 1024 tokens of context
            seed=seed,
        )
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        for call in choice.message.tool_calls:
            schema = WEATHER_PARAMETERS if call.function.name == "get_weather" else TIME["function"]["parameters"]
            jsonschema.validate(json.loads(call.function.arguments), schema)


# What the random model writes under tool_choice auto is steered by vLLM's regex constraint: a hermes call block,
# or plain text; the server's parser (model.tool_call_parser: hermes) must read each for what it is.
CALL_BLOCK = (
    r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "Paris", "unit": "celsius"\}\}\n</tool_call>'
)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_reads_a_call_or_text_with_the_models_parser(client, stream):
    def ask(regex: str):
        return client.chat.completions.create(
            model="mmrag-tiny-llava",
            messages=[{"role": "user", "content": "weather in Paris?"}],
            tools=[WEATHER],  # tool_choice defaults to auto
            max_tokens=160,  # the tiny tokenizer spends about a token a character
            stream=stream,
            extra_body={"structured_outputs": {"regex": regex}},
        )

    if stream:
        chunks = [c for c in ask(CALL_BLOCK) if c.choices]
        deltas = [c.choices[0].delta for c in chunks]
        calls = [t for d in deltas for t in d.tool_calls or []]
        assert calls and calls[0].function.name == "get_weather" and calls[0].id and calls[0].type == "function"
        arguments = "".join(t.function.arguments or "" for t in calls)
        assert not "".join(d.content or "" for d in deltas).strip()
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        text = "".join(c.choices[0].delta.content or "" for c in ask("Paris is sunny[.]") if c.choices)
    else:
        choice = ask(CALL_BLOCK).choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        arguments = call.function.arguments
        answer = ask("Paris is sunny[.]").choices[0]
        assert answer.finish_reason == "stop" and not answer.message.tool_calls
        text = answer.message.content
    assert json.loads(arguments) == {"city": "Paris", "unit": "celsius"}
    assert text == "Paris is sunny."


def test_langchain_structured_output_and_bound_tools(smol):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=MODEL, base_url=str(smol.base_url), api_key="unused", max_retries=0, temperature=0, max_tokens=200
    )
    city = llm.with_structured_output(City).invoke("Describe the city of Rome.")
    assert isinstance(city, City)
    message = llm.bind_tools([WEATHER, TIME], tool_choice="get_weather").invoke("Weather in Oslo?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(call["args"], WEATHER_PARAMETERS)
    message = llm.bind_tools([WEATHER, TIME], tool_choice="any").invoke("What time is it in Tokyo?")
    assert message.tool_calls and message.tool_calls[0]["name"] in ("get_weather", "get_time")


def test_llamaindex_openai_like_chat(smol):
    pytest.importorskip("llama_index.llms.openai_like", reason="llama-index-llms-openai-like is not installed")
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(
        model=MODEL,
        api_base=str(smol.base_url),
        api_key="unused",
        is_chat_model=True,
        context_window=2048,
        max_tokens=48,
        temperature=0,
        max_retries=0,
    )
    response = llm.chat([ChatMessage(role="user", content="Who first recorded Comet Orrin-7?")])
    assert response.message.content.strip()
    raw = response.raw if isinstance(response.raw, dict) else response.raw.model_dump()
    assert "orrin-comet.md" in [d["source"].rsplit("/", 1)[-1] for d in raw["retrieval"]["documents"]], raw
