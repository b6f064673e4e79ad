"""Tool calls over the real app and a fake engine: validation, the constraint a forced call gets, and the
response shapes (whole and streamed) read back from the constrained output.

The fake engine echoes the last user text word by word, so a test sends the output it wants the "model" to
produce; the constraint the engine was given is read from ``engine.seen``.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from mmrag.serving.openai.protocol import ChatCompletionRequest
from mmrag.serving.openai.tools import plan_tools, tool_call_deltas
from mmrag.serving.retrieval.protocol import RetrievalInfo
from tests.server.fake_app import (
    MODEL,
    TIME,
    WEATHER,
    OneDocument,
    app_fixtures,
    assert_error,
    chat,
    engine_deltas,
    read_through,
    sse_chunks,
)

NAMED = {"type": "function", "function": {"name": "get_weather"}}

served, engine, http, client = app_fixtures(
    {"retrieval": {"default_mode": "none"}, "limits": {"max_schema_bytes": 4096, "max_tools": 4, "max_n": 2}},
    OneDocument(),
)


def test_named_tool_choice_returns_the_call_and_constrains_to_its_parameters(client, engine):
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": '{"city": "Paris"}'}],
        tools=[WEATHER, TIME],
        tool_choice=NAMED,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    (seen,) = engine.seen
    assert json.loads(seen.sampling.structured.spec) == WEATHER["function"]["parameters"]
    assert seen.sampling.structured.param == "tools"
    assert [t["function"]["name"] for t in seen.tools] == ["get_weather"]  # the model sees the chosen tool


def test_required_reads_an_array_of_calls_with_distinct_ids(client, engine):
    weather = '{"name": "get_weather", "arguments": {"city": "Paris \\"Nord\\" {x}"}}'
    output = f'[{weather}, {{"name": "get_time", "arguments": {{}}}}]'
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": output}], tools=[WEATHER, TIME], tool_choice="required"
    )
    calls = response.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": 'Paris "Nord" {x}'}
    assert json.loads(calls[1].function.arguments) == {}
    assert calls[0].id != calls[1].id
    assert response.choices[0].finish_reason == "tool_calls"
    schema = json.loads(engine.seen[0].sampling.structured.spec)
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    names = [item["properties"]["name"]["enum"] for item in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    assert schema["items"]["anyOf"][0]["properties"]["arguments"] == WEATHER["function"]["parameters"]


def test_parallel_tool_calls_false_allows_one_call(http, engine):
    body = chat(
        '[{"name": "get_time", "arguments": {}}]', tools=[TIME], tool_choice="required", parallel_tool_calls=False
    )
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    schema = json.loads(engine.seen[0].sampling.structured.spec)
    assert schema["maxItems"] == 1 and schema["items"]["properties"]["name"]["enum"] == ["get_time"]


def test_streamed_named_call_sends_its_arguments_as_they_come(http):
    body = chat('{"city": "New York City"}', tools=[WEATHER], tool_choice=NAMED, stream=True)
    chunks = sse_chunks(http.post("/v1/chat/completions", json=body))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [d["tool_calls"] for d in deltas if d.get("tool_calls")]
    assert len(calls) > 2  # the arguments arrive in several pieces
    first = calls[0][0]
    assert set(first) == {"index", "id", "type", "function"} and first["type"] == "function"
    assert first["function"]["name"] == "get_weather" and first["id"].startswith("call_")
    assert all(set(c[0]) == {"index", "function"} and set(c[0]["function"]) == {"arguments"} for c in calls[1:])
    assert json.loads("".join(c[0]["function"]["arguments"] for c in calls)) == {"city": "New York City"}
    assert deltas[0]["role"] == "assistant" and all(d["content"] is None for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_streamed_required_calls_arrive_whole_and_the_sdk_accumulates_them(client):
    output = '[{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "get_time", "arguments": {}}]'
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": output}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces = [
        (tc.index, tc.function.name, tc.function.arguments)
        for c in stream
        if c.choices
        for tc in c.choices[0].delta.tool_calls or ()
    ]
    assert pieces == [(0, "get_weather", '{"city":"Rome"}'), (1, "get_time", "{}")]

    with client.chat.completions.stream(
        model=MODEL, messages=[{"role": "user", "content": output}], tools=[WEATHER, TIME], tool_choice="required"
    ) as events:
        final = events.get_final_completion()
    assert [c.function.name for c in final.choices[0].message.tool_calls] == ["get_weather", "get_time"]
    assert final.choices[0].finish_reason == "tool_calls"


def test_n_choices_each_get_their_calls(client):
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": '{"city": "Lima"}'}],
        tools=[WEATHER],
        tool_choice=NAMED,
        n=2,
        temperature=0.5,
    )
    assert [json.loads(c.message.tool_calls[0].function.arguments) for c in response.choices] == [{"city": "Lima"}] * 2


def test_retrieved_documents_in_a_tool_call_out(http, engine):
    body = chat('{"city": "Paris"}', tools=[WEATHER], tool_choice=NAMED, retrieval={"mode": "text"})
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    call = response.json()["choices"][0]["message"]["tool_calls"][0]["function"]
    assert (call["name"], json.loads(call["arguments"])) == ("get_weather", {"city": "Paris"})
    (seen,) = engine.seen
    assert seen.retrieval.chunks[0].text == "Paris is in France." and seen.tools[0]["function"]["name"] == "get_weather"


def test_the_call_reader_sends_retrieval_at_once_and_holds_back_empty_deltas():
    """The engine puts retrieval info on its first delta: it goes out at once (the stream's first chunk), with
    no call yet; deltas with nothing to send are dropped; the call goes out whole, then the finish."""
    plan = plan_tools(ChatCompletionRequest.model_validate(chat("x", tools=[WEATHER, TIME], tool_choice="required")))
    info = RetrievalInfo(mode="text")
    deltas = engine_deltas([" ", '[{"name": "get_time", ', '"arguments": {}}', "]"], info)
    out = asyncio.run(read_through(lambda source: tool_call_deltas(source, plan), deltas))
    assert [(d.retrieval, d.finish_reason, d.completion_tokens) for d in out] == [
        (info, None, 1),
        (None, None, 3),
        (None, "tool_calls", 4),
    ]
    assert out[0].tool_calls == () and out[2].tool_calls == () and all(d.text == "" for d in out)
    (call,) = out[1].tool_calls
    assert (call.index, call.name, call.arguments) == (0, "get_time", "{}") and call.id.startswith("call_")


def test_tool_choice_none_answers_in_text_without_showing_tools(client, engine):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "just talk"}], tools=[WEATHER], tool_choice="none"
    )
    assert response.choices[0].message.content == "just talk " and response.choices[0].message.tool_calls is None
    assert response.choices[0].finish_reason == "stop"
    assert engine.seen[0].tools is None and engine.seen[0].sampling.structured is None


@pytest.mark.parametrize("extra", [{}, {"tool_choice": "auto"}])
def test_auto_is_a_400_naming_tool_choice_without_a_parser(http, engine, extra):
    response = http.post("/v1/chat/completions", json=chat("hi", tools=[WEATHER], **extra))
    assert_error(response, "tool_choice", "tool-call parser")
    assert engine.seen == []


def test_history_with_calls_and_results_reaches_the_template(client, engine):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
        {"role": "user", "content": "and now?"},
    ]
    response = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none")
    assert response.choices[0].message.content == "and now? "
    seen = engine.seen[0].messages
    assert seen[1]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ]
    assert seen[2] == {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call_1"}


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (chat("x", tools=[WEATHER, WEATHER], tool_choice="required"), "tools[1].function.name", "names two tools"),
        (
            chat("x", tools=[{"type": "function", "function": {"name": "no spaces"}}], tool_choice="required"),
            "tools[0].function.name",
            "",
        ),
        (chat("x", tools=[{"type": "custom", "custom": {"name": "f"}}], tool_choice="required"), "tools[0].type", ""),
        (
            chat(
                "x",
                tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
                tool_choice="required",
            ),
            "tools[0].function.parameters",
            "not a valid JSON schema",
        ),
        (
            chat(
                "x",
                tools=[{"type": "function", "function": {"name": "f", "parameters": {"enum": ["y" * 5000]}}}],
                tool_choice="required",
            ),
            "tools[0].function.parameters",
            "limits.max_schema_bytes",
        ),
        (chat("x", tools=[TIME] * 5, tool_choice="required"), "tools", "at most 4"),
        (
            chat("x", tools=[TIME], tool_choice={"type": "function", "function": {"name": "nope"}}),
            "tool_choice",
            "not among",
        ),
        (chat("x", tool_choice="required"), "tool_choice", "needs tools"),
        (chat("x", tools=[TIME], tool_choice="sometimes"), "tool_choice", ""),
        (
            chat("x", tools=[WEATHER], tool_choice=NAMED, response_format={"type": "json_object"}),
            "response_format",
            "one or the other",
        ),
        (
            chat("x", tools=[WEATHER], tool_choice="required", structured_outputs={"regex": "a"}),
            "structured_outputs",
            "",
        ),
        (chat("x", parallel_tool_calls="many"), "parallel_tool_calls", ""),
    ],
)
def test_bad_tools_are_400s_naming_the_field(http, engine, body, param, fragment):
    assert_error(http.post("/v1/chat/completions", json=body), param, fragment)
    assert engine.seen == []


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "tool", "content": "18 C"}, "messages[1]"),
        ({"role": "user", "content": "x", "tool_call_id": "c"}, "messages[1]"),
        (
            {
                "role": "user",
                "content": "x",
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            "messages[1]",
        ),
        (
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]},
            "messages[1].tool_calls[0].function.arguments",
        ),
    ],
)
def test_bad_tool_messages_are_400s(http, engine, message, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}, message]}
    assert_error(http.post("/v1/chat/completions", json=body), param)
    assert engine.seen == []


def test_raw_control_characters_in_strings_come_back_escaped(http):
    """The grammars let a model write raw control characters inside strings (a random model does); JSON
    forbids them, so the server escapes them: the calls and JSON answers parse with strict parsers."""
    named = chat('{"city": "Pa\x07ris\\"\x01"}', tools=[WEATHER], tool_choice=NAMED)
    arguments = http.post("/v1/chat/completions", json=named).json()["choices"][0]["message"]["tool_calls"][0]
    assert json.loads(arguments["function"]["arguments"]) == {"city": 'Pa\x07ris"\x01'}
    required = chat('[{"name": "get_weather", "arguments": {"city": "\x02"}}]', tools=[WEATHER], tool_choice="required")
    call = http.post("/v1/chat/completions", json=required).json()["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["arguments"] == '{"city":"\\u0002"}'
    answer = chat('{"a": "b\x07"}', response_format={"type": "json_object"}, stream=True)
    text = "".join(
        c["choices"][0]["delta"]["content"] or "" for c in sse_chunks(http.post("/v1/chat/completions", json=answer))
    )
    assert json.loads(text) == {"a": "b\x07"} and "\x07" not in text


def test_required_moves_parameter_definitions_to_the_root_where_their_references_resolve(http, engine):
    place = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    params = {"type": "object", "properties": {"at": {"$ref": "#/$defs/Place"}}, "$defs": {"Place": place}}
    trip = {"type": "function", "function": {"name": "plan_trip", "parameters": params}}
    body = chat(
        '[{"name": "plan_trip", "arguments": {"at": {"city": "Kyoto"}}}]', tools=[trip, TIME], tool_choice="required"
    )
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    schema = json.loads(engine.seen[0].sampling.structured.spec)
    assert schema["$defs"] == {"Place": place}
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["arguments"]
    other = {
        "type": "function",
        "function": {"name": "g", "parameters": {**params, "$defs": {"Place": {"type": "string"}}}},
    }
    response = http.post("/v1/chat/completions", json={**body, "tools": [trip, other]})
    assert_error(response, "tools[1].function.parameters", "differs from another tool's")
