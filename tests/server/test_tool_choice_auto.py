"""``tool_choice: auto`` over the real app, vLLM's own ``hermes`` parser and a fake engine: the answer is read back
as text or as calls, whole and streamed, through the `openai` SDK.

The fake engine echoes the last user text word by word, so a test sends the output it wants the "model" to
produce: a ``<tool_call>`` block as the fallback tool prompt asks for, or plain text. The parser runs over a real
tokenizer: the shipped tiny-mllm checkpoint's (``model.path``; nothing to prepare), served as ``smol``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json

import pytest
from fastapi.testclient import TestClient

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.tool_prompt import render_tools
from mmrag.serving.models.trained import trained_model_path
from mmrag.serving.openai.server import create_app
from mmrag.serving.openai.tool_parsing import ToolCallParsing
from mmrag.serving.pipeline import LocalBackend
from mmrag.serving.retrieval.protocol import RetrievalInfo
from tests.fake_engine import FakeEngine
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

# The first request waits for vLLM's import (10-25 s on the 2-core machine, once per process).
pytestmark = pytest.mark.slow

CALL = '<tool_call> {"name": "get_weather", "arguments": {"city": "Paris"}} </tool_call>'

served, engine, http, client = app_fixtures(
    {
        "model": {"path": str(trained_model_path()), "served_name": MODEL, "tool_call_parser": "hermes"},
        "retrieval": {"default_mode": "none"},
        "limits": {"max_n": 2},
    },
    OneDocument(),
)


def test_a_call_in_the_answer_becomes_tool_calls(client, engine):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": CALL}], tools=[WEATHER, TIME]
    )  # no tool_choice: auto, the default with tools
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    (seen,) = engine.seen
    assert [t["function"]["name"] for t in seen.tools] == ["get_weather", "get_time"]  # the model sees them all
    assert seen.sampling.structured is None  # free text: the model chooses
    assert seen.sampling.skip_special_tokens is False  # hermes: call markers may be special tokens
    assert seen.sampling.return_token_ids is True


def test_an_answer_without_a_call_is_a_message(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "It is sunny."}], tools=[WEATHER], tool_choice="auto"
    )
    choice = response.choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == ("It is sunny. ", None, "stop")


def test_text_before_two_calls(client):
    second = '<tool_call> {"name": "get_time", "arguments": {}} </tool_call>'
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Let me look. {CALL} {second}"}], tools=[WEATHER, TIME]
    )
    message = response.choices[0].message
    assert message.content.strip() == "Let me look."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert len({c.id for c in message.tool_calls}) == 2


@pytest.mark.parametrize("stream", [False, True])
def test_parallel_tool_calls_false_keeps_the_first_call(http, stream):
    second = '<tool_call> {"name": "get_time", "arguments": {}} </tool_call>'
    body = chat(f"{CALL} {second}", tools=[WEATHER, TIME], parallel_tool_calls=False, stream=stream)
    response = http.post("/v1/chat/completions", json=body)
    if stream:
        pieces = [
            tc for c in sse_chunks(response) if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls") or ()
        ]
        names = [p["function"]["name"] for p in pieces if "name" in p["function"]]
        assert names == ["get_weather"] and {p["index"] for p in pieces} == {0}
    else:
        calls = response.json()["choices"][0]["message"]["tool_calls"]
        assert [c["function"]["name"] for c in calls] == ["get_weather"]


def test_streamed_call_arrives_as_openai_sends_it(http):
    chunks = sse_chunks(http.post("/v1/chat/completions", json=chat(CALL, tools=[WEATHER], stream=True)))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    pieces = [tc for d in deltas for tc in d.get("tool_calls") or ()]
    first, rest = pieces[0], pieces[1:]
    assert set(first) == {"index", "id", "type", "function"} and first["type"] == "function"
    assert first["index"] == 0 and first["id"].startswith("call_") and first["function"]["name"] == "get_weather"
    assert rest and all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in rest)
    arguments = first["function"].get("arguments", "") + "".join(p["function"]["arguments"] for p in rest)
    assert json.loads(arguments) == {"city": "Paris"}
    assert not any(d.get("content") for d in deltas)  # the markers and the JSON are not text
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_streamed_text_and_the_sdk_accumulates_calls(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "no call here"}], tools=[WEATHER], stream=True
    )
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "no call here "
    assert chunks[-1].choices[0].finish_reason == "stop"
    with client.chat.completions.stream(
        model=MODEL, messages=[{"role": "user", "content": f"Sure. {CALL}"}], tools=[WEATHER]
    ) as events:
        final = events.get_final_completion()
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls" and message.content.strip() == "Sure."
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_a_stream_that_ends_like_a_marker_still_sends_all_its_text(served):
    """The parser holds back a tail that may begin ``<tool_call>``; when the answer ends there, it is text."""
    parsing = ToolCallParsing("hermes", served[0].config.model)
    reader = functools.partial(parsing.deltas, tools=[WEATHER], stream=True)
    out = asyncio.run(read_through(reader, engine_deltas(["a < b ", "<tool"], None)))
    assert [d.text for d in out] == ["a < b ", "<tool"] and out[-1].finish_reason == "stop"
    assert all(d.tool_calls is None for d in out)


@pytest.mark.parametrize("stream", [True, False])
def test_a_real_tokenizers_pieces_read_back(served, stream):
    """Token by token as a model writes them (the markers split across several tokens): the text before the call
    is content, the call's pieces add up to its arguments."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained_model_path())
    answer = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    ids = tokenizer.encode(answer, add_special_tokens=False)
    texts = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    pieces = [text[len(before) :] for before, text in zip(["", *texts], texts, strict=False)]
    assert "".join(pieces) == answer and len(pieces) > 20
    deltas = [dataclasses.replace(d, token_ids=(i,)) for d, i in zip(engine_deltas(pieces, None), ids, strict=True)]
    parsing = ToolCallParsing("hermes", served[0].config.model)
    out = asyncio.run(read_through(functools.partial(parsing.deltas, tools=[WEATHER], stream=stream), deltas))
    assert "".join(d.text for d in out) == "Let me check.\n"
    calls = [c for d in out for c in d.tool_calls or ()]
    assert [c.name for c in calls if c.name] == ["get_weather"] and calls[0].id.startswith("call_")
    assert json.loads("".join(c.arguments for c in calls)) == {"city": "Paris"}
    assert out[-1].finish_reason == "tool_calls" and out[-1].completion_tokens == len(ids)


def test_n_choices_are_parsed_apart(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": CALL}], tools=[WEATHER], n=2, temperature=0.5
    )
    assert [c.message.tool_calls[0].function.name for c in response.choices] == ["get_weather"] * 2


@pytest.mark.parametrize("stream", [False, True])
def test_retrieved_documents_in_a_call_out(http, engine, stream):
    body = chat(CALL, tools=[WEATHER], retrieval={"mode": "text"}, stream=stream)
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    if stream:
        assert sse_chunks(response)[-1]["choices"][0]["finish_reason"] == "tool_calls"
    else:
        assert response.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    (seen,) = engine.seen
    assert seen.retrieval.chunks[0].text == "Paris is in France." and len(seen.tools) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_retrieval_info_goes_out_once_first_and_counts_ride_on_the_last(served, stream):
    """The engine puts retrieval info on its first delta (the fake one does not): it goes out at once, on one
    delta only, whatever the parser makes of the text; the finish carries the last counts."""
    info = RetrievalInfo(mode="text")
    words = ["Sure. ", "<tool_call> ", '{"name": "get_weather", ', '"arguments": {"city": "Oslo"}} ', "</tool_call>"]
    parsing = ToolCallParsing("hermes", served[0].config.model)  # the app's own is not reachable from here
    reader = functools.partial(parsing.deltas, tools=[WEATHER], stream=stream)
    out = asyncio.run(read_through(reader, engine_deltas(words, info)))
    assert [d.retrieval for d in out].count(info) == 1 and out[0].retrieval == info
    assert out[-1].finish_reason == "tool_calls" and out[-1].completion_tokens == 5
    assert "".join(d.text for d in out).strip() == "Sure."
    calls = [c for d in out for c in d.tool_calls or ()]
    assert calls[0].name == "get_weather" and json.loads("".join(c.arguments for c in calls)) == {"city": "Oslo"}


def test_forced_and_none_choices_are_unchanged_with_a_parser(client, engine):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": CALL}], tools=[WEATHER], tool_choice="none"
    )
    assert response.choices[0].message.content == CALL + " " and response.choices[0].message.tool_calls is None
    assert engine.seen[0].sampling.skip_special_tokens is True


def test_the_fallback_prompt_asks_for_the_format_hermes_reads():
    """A template without a tools section gets the Hermes convention: the block the parser reads."""
    messages, tools = render_tools([{"role": "user", "content": "hi"}], [WEATHER], "{{ messages }}")
    assert tools is None and "<tool_call>" in messages[0]["content"] and "</tool_call>" in messages[0]["content"]


def test_unknown_parser_is_a_config_error():
    with pytest.raises(ValueError, match=r"unknown tool-call parser 'hermez'.*hermes"):
        MmragConfig.model_validate({"model": {"tool_call_parser": "hermez"}})


def test_without_a_parser_auto_is_still_a_400():
    engine = FakeEngine(MmragConfig.model_validate({"retrieval": {"default_mode": "none"}}))
    with TestClient(create_app(engine.config, LocalBackend(engine))) as http:
        response = http.post("/v1/chat/completions", json=chat("hi", tools=[WEATHER]))
    assert_error(response, "tool_choice", "model.tool_call_parser")
