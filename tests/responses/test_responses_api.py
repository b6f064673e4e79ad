"""POST /v1/responses through the real `openai` SDK: text and image input, instructions, sampling, the event
stream (the SDK's own parser, the full event order), file_search over a vector store with citations and
included results, and every refusal in OpenAI's error shape naming the Responses field."""

from __future__ import annotations

import base64
import json

import openai
import pytest

from tests.files.documents import png_bytes
from tests.responses.conftest import MODEL

QUESTION = "When did the Harrowgate funicular open?"
FILE_SEARCH_EVENTS = [
    "response.output_item.added",
    "response.file_search_call.in_progress",
    "response.file_search_call.searching",
    "response.file_search_call.completed",
    "response.output_item.done",
]


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def file_search(store_id: str, **fields) -> dict:
    return {"type": "file_search", "vector_store_ids": [store_id], **fields}


def test_plain_text_input(client, engine):
    response = client.responses.create(model=MODEL, input="name three herons")
    assert response.object == "response" and response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text == "name three herons " and response.model == MODEL
    (message,) = response.output
    assert (message.type, message.role, message.status) == ("message", "assistant", "completed")
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    usage = response.usage
    assert (usage.output_tokens, usage.total_tokens) == (3, usage.input_tokens + 3) and usage.input_tokens > 0
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0
    seen = engine.seen[-1]
    assert seen.messages == [{"role": "user", "content": "name three herons"}]
    assert seen.retrieval is None  # no file_search tool: no retrieval, whatever the server's default


def test_instructions_sampling_metadata_and_a_cut_answer(client, engine):
    response = client.responses.create(
        model=MODEL,
        instructions="Answer in one word.",
        input=[{"role": "user", "content": "one two three four"}],
        temperature=0.2,
        top_p=0.5,
        max_output_tokens=2,
        metadata={"ticket": "42"},
        user="u-7",
        store=True,  # accepted; nothing is stored
    )
    seen = engine.seen[-1]
    assert seen.messages[0] == {"role": "system", "content": "Answer in one word."}
    assert (seen.sampling.temperature, seen.sampling.top_p, seen.sampling.max_tokens) == (0.2, 0.5, 2)
    assert response.output_text == "one two "
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"
    assert (response.instructions, response.metadata, response.user) == ("Answer in one word.", {"ticket": "42"}, "u-7")
    assert (response.temperature, response.top_p, response.max_output_tokens) == (0.2, 0.5, 2)
    # A multi-turn input: an earlier assistant output goes back in as output_text.
    client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "hi"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hello"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "again"}]},
        ],
    )
    assert [m["role"] for m in engine.seen[-1].messages] == ["user", "assistant", "user"]
    assert engine.seen[-1].messages[1]["content"] == [{"type": "text", "text": "hello"}]


def test_image_input(client, engine):
    response = client.responses.create(
        model=MODEL,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "describe this"},
                    {"type": "input_image", "image_url": data_url(png_bytes((12, 10))), "detail": "low"},
                ],
            }
        ],
    )
    assert response.output_text == "describe this "
    seen = engine.seen[-1]
    assert [image.size for image in seen.images] == [(12, 10)]
    assert seen.messages[0]["content"] == [{"type": "text", "text": "describe this"}, {"type": "image"}]


def test_streaming_events_in_order(client):
    with client.responses.stream(model=MODEL, input="a b c", instructions="be brief") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "a b c "
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id
    assert events[7].text == "a b c " and events[8].part.text == "a b c "
    assert final.output_text == "a b c " and final.status == "completed" and final.usage.output_tokens == 3
    # create(stream=True) yields the same typed events.
    types = [e.type for e in client.responses.create(model=MODEL, input="x", stream=True)]
    assert types[0] == "response.created" and types[-1] == "response.completed"


def test_stream_wire_format(http):
    """Each event is `event: <type>` then `data: {...}` with the same type; no [DONE] (OpenAI sends none)."""
    with http.stream("POST", "/v1/responses", json={"model": MODEL, "input": "hi", "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        blocks = "".join(response.iter_text()).strip().split("\n\n")
    for block in blocks:
        event_line, data_line = block.split("\n")
        payload = json.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {payload['type']}"
    assert json.loads(blocks[-1].split("\n")[1][6:])["type"] == "response.completed"


def test_error_mid_stream_is_an_error_event_then_the_end(http):
    body = {"model": MODEL, "input": "fail now", "stream": True}
    with http.stream("POST", "/v1/responses", json=body) as response:
        assert response.status_code == 200
        payloads = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    types = [p["type"] for p in payloads]
    assert types[-2:] == ["response.output_text.delta", "error"], types
    assert payloads[-1]["param"] == "input" and "refused" in payloads[-1]["message"]  # named as Responses names it
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))


def test_file_search_cites_the_file_it_used(client, store, engine):
    store_id, ids = store
    response = client.responses.create(model=MODEL, input=QUESTION, tools=[file_search(store_id, max_num_results=1)])
    call, message = response.output
    assert (call.type, call.status, call.queries, call.results) == ("file_search_call", "completed", [QUESTION], None)
    text = message.content[0].text
    assert "funicular opened in 1898" in text and text.endswith(QUESTION + " ")  # the chunk was in the prompt
    (citation,) = message.content[0].annotations
    assert (citation.type, citation.file_id, citation.filename) == ("file_citation", ids["trains.txt"], "trains.txt")
    assert citation.index == len(text)
    assert engine.seen[-1].retrieval.info.documents[0].file_id == ids["trains.txt"]
    # Two results: both files enter the prompt, both are cited, best first.
    response = client.responses.create(model=MODEL, input=QUESTION, tools=[file_search(store_id, max_num_results=2)])
    names = [a.filename for a in response.output[1].content[0].annotations]
    assert names == ["trains.txt", "herons.md"]
    # A filter on the attributes narrows the search: only the bird file can be found and cited.
    response = client.responses.create(
        model=MODEL,
        input=QUESTION,
        tools=[file_search(store_id, filters={"type": "eq", "key": "topic", "value": "birds"})],
    )
    assert [a.file_id for a in response.output[1].content[0].annotations] == [ids["herons.md"]]
    # tool_choice none: the tool is not used; no search, no call item, no citation.
    response = client.responses.create(model=MODEL, input=QUESTION, tools=[file_search(store_id)], tool_choice="none")
    assert [item.type for item in response.output] == ["message"] and engine.seen[-1].retrieval is None


def test_file_search_results_when_included(client, store):
    store_id, ids = store
    response = client.responses.create(
        model=MODEL,
        input=QUESTION,
        tools=[file_search(store_id, max_num_results=2)],
        include=["file_search_call.results"],
    )
    results = response.output[0].results
    assert [r.file_id for r in results] == [ids["trains.txt"], ids["herons.md"]]
    assert results[0].filename == "trains.txt" and "opened in 1898" in results[0].text
    assert results[0].attributes == {"topic": "rail", "year": 1898} and results[0].score >= results[1].score


def test_file_search_streamed(client, store):
    store_id, ids = store
    with client.responses.stream(
        model=MODEL,
        input=QUESTION,
        tools=[file_search(store_id, max_num_results=1)],
        include=["file_search_call.results"],
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[:7] == ["response.created", "response.in_progress", *FILE_SEARCH_EVENTS]
    assert types[7:9] == ["response.output_item.added", "response.content_part.added"]
    assert types[-5:] == [
        "response.output_text.annotation.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[2].item.status == "in_progress" and events[6].item.results[0].file_id == ids["trains.txt"]
    assert events[7].output_index == 1 and events[-5].annotation.filename == "trains.txt"
    assert [item.type for item in final.output] == ["file_search_call", "message"]
    assert final.output[1].content[0].annotations[0].file_id == ids["trains.txt"]


def test_unknown_store_is_a_404(client, store):
    store_id, _ = store
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(
            model=MODEL, input=QUESTION, tools=[file_search(store_id) | {"vector_store_ids": [store_id, "vs_nope"]}]
        )
    assert caught.value.body["param"] == "tools[0].vector_store_ids" and "vs_nope" in caught.value.body["message"]


UNIMPLEMENTED = [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"max_tool_calls": 3}, "max_tool_calls"),
    ({"background": True}, "background"),
    ({"truncation": "auto"}, "truncation"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}}, "text.format.type"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools[0].type"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"include": ["message.output_text.logprobs"]}, "include[0]"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "o"}]}, "input[0].type"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
        "input[0].content[0].type",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
        "input[0].content[0].file_id",
    ),
]


@pytest.mark.parametrize(("fields", "param"), UNIMPLEMENTED, ids=[p for _, p in UNIMPLEMENTED])
def test_unimplemented_fields_are_a_400_naming_them(client, fields, param):
    body = {"model": MODEL, "input": "hi", **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**body)
    error = caught.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert "not supported" in error["message"] or "Input should be" in error["message"], error


def test_ignored_fields_pass(client):
    response = client.responses.create(
        model=MODEL,
        input="hi",
        store=False,
        parallel_tool_calls=False,
        tool_choice="auto",
        text={"format": {"type": "text"}},
        truncation="disabled",
        service_tier="auto",
        prompt_cache_key="k",
        safety_identifier="s",
    )
    assert response.output_text == "hi " and response.parallel_tool_calls is False


BAD_INPUT = [
    ({"input": None}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, 400, "input[0].role"),
    ({"input": [{"role": "user"}]}, 400, "input[0].content"),
    ({"input": [{"role": "assistant", "content": [{"type": "input_image", "image_url": "data:,x"}]}]}, 400, "input[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, 400, "input[0].content[0].image_url"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]},
        400,
        "input[0].content[0].image_url",
    ),
    (
        {
            "instructions": "sys",
            "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/a.png"}]}],
        },
        400,
        "input[0].content[0].image_url",  # instructions took messages[0]: the name is still the input's
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": data_url(png_bytes())}]}] * 3},
        400,
        "input",
    ),
    ({"instructions": 5}, 400, "instructions"),
    ({"max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"temperature": 3}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"metadata": {"k": "v" * 600}}, 400, "metadata.k"),
    ({"model": "gpt-nope"}, 404, "model"),
    ({"tools": [{"type": "file_search"}]}, 400, "tools[0].vector_store_ids"),
    ({"tools": [{"type": "file_search", "vector_store_ids": []}]}, 400, "tools[0].vector_store_ids"),
    (
        {"tools": [{"type": "file_search", "vector_store_ids": ["vs_x"], "max_num_results": 51}]},
        400,
        "tools[0].max_num_results",
    ),
    (
        {"tools": [{"type": "file_search", "vector_store_ids": ["vs_x"], "filters": {"type": "eq"}}]},
        400,
        "tools[0].filters",
    ),
    (
        {"tools": [{"type": "file_search", "vector_store_ids": ["vs_x"], "ranking_options": {"score_threshold": 0.5}}]},
        400,
        "tools[0].ranking_options.score_threshold",
    ),
    (
        {
            "tools": [
                {"type": "file_search", "vector_store_ids": ["a"]},
                {"type": "file_search", "vector_store_ids": ["b"]},
            ]
        },
        400,
        "tools",
    ),
    ({"input": "\ud800"}, 400, "input"),
]


@pytest.mark.parametrize(("fields", "status", "param"), BAD_INPUT, ids=[p for *_, p in BAD_INPUT])
def test_bad_input_names_the_field(http, fields, status, param):
    body = {"model": MODEL, "input": "hi", **fields}
    response = http.post("/v1/responses", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"], error


def test_bodies_that_are_not_requests(http):
    for content, headers, param in [
        (b"{", {"content-type": "application/json"}, None),
        (b"[]", {"content-type": "application/json"}, None),
        (b'{"model": "smol", "input": "hi"}', {"content-type": "text/plain"}, "Content-Type"),
    ]:
        response = http.post("/v1/responses", content=content, headers=headers)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_stored_responses_are_not_served(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve("resp_123")
    assert "not stored" in caught.value.body["message"]


def test_file_search_where_there_are_no_vector_stores(encoder, tmp_path, monkeypatch):
    """No retriever behind the app: a 404; a retriever with vector stores off: a 400 (as chat); both name
    the tool's vector_store_ids."""
    from fastapi.testclient import TestClient

    from mmrag.serving.config import MmragConfig
    from mmrag.serving.openai.server import create_app
    from mmrag.serving.pipeline import LocalBackend
    from mmrag.serving.retrieval import retriever as retriever_module
    from mmrag.serving.retrieval.stage import RetrievalStage
    from tests.fake_engine import FakeEngine
    from tests.vector_stores.conftest import close_stage

    monkeypatch.setattr(retriever_module, "load_encoder", lambda _config: encoder)
    config = MmragConfig.model_validate(
        {
            "retrieval": {"uri": str(tmp_path / "milvus.db"), "ingest_demo_corpus": False, "default_mode": "none"},
            "files": {"directory": str(tmp_path / "files")},
            "vector_stores": {"enabled": False},
        }
    )
    stage = RetrievalStage(config)
    body = {"model": MODEL, "input": "q", "tools": [file_search("vs_1")]}
    try:
        for backend, status in [
            (LocalBackend(FakeEngine(config)), 404),
            (LocalBackend(FakeEngine(config), stage), 400),
        ]:
            with TestClient(create_app(config, backend)) as http:
                response = http.post("/v1/responses", json=body)
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert error["param"] == "tools[0].vector_store_ids" and "not enabled" in error["message"], error
    finally:
        close_stage(stage)


def test_chat_errors_are_named_as_responses_fields(http):
    """An error raised on the chat path names the Responses field, in its param and its message."""
    body = {
        "model": MODEL,
        "instructions": "sys",
        "input": [
            {"role": "user", "content": "first"},
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "x"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                ],
            },
        ],
    }
    error = http.post("/v1/responses", json=body).json()["error"]
    assert error["param"] == "input[1].content[1].image_url", error
    assert "messages" not in error["message"], error


def test_citations_come_from_the_engine_s_copy(config, engine, stage, store):
    """Behind Serve the engine gets a copy of the request (pickled across the handle), so only the deltas
    say how many chunks entered the prompt: the citations must come from there."""
    import copy

    from fastapi.testclient import TestClient

    from mmrag.serving.openai.server import create_app
    from mmrag.serving.pipeline import LocalBackend

    class CopyingBackend(LocalBackend):
        def generate(self, request):
            return super().generate(copy.deepcopy(request))

    store_id, ids = store
    with TestClient(create_app(config, CopyingBackend(engine, stage))) as http:
        body = {"model": MODEL, "input": QUESTION, "tools": [file_search(store_id, max_num_results=1)]}
        message = http.post("/v1/responses", json=body).json()["output"][1]
    assert [a["file_id"] for a in message["content"][0]["annotations"]] == [ids["trains.txt"]]


def test_a_previous_output_sent_back_as_input(client, store, engine):
    """The multi-turn pattern `input=[*earlier input, *response.output, next question]`: the earlier
    file_search_call is accepted and dropped, the message goes back as an assistant turn."""
    store_id, _ = store
    first = client.responses.create(model=MODEL, input=QUESTION, tools=[file_search(store_id, max_num_results=1)])
    follow_up = [
        {"role": "user", "content": QUESTION},
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"role": "user", "content": "and how high does it climb"},
    ]
    response = client.responses.create(model=MODEL, input=follow_up)
    assert response.output_text == "and how high does it climb "
    seen = engine.seen[-1]
    assert [m["role"] for m in seen.messages] == ["user", "assistant", "user"]
    assert seen.messages[1]["content"][0]["text"] == first.output_text
    # An error in a message after the skipped call still names that message's place in `input`.
    bad = [
        *follow_up[:2],
        {"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
    ]
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input=bad)
    assert caught.value.body["param"] == "input[2].content[0].image_url"
    assert bad[1]["type"] == "file_search_call"


def test_a_cut_stream_ends_with_response_incomplete(client):
    """As OpenAI does: an answer cut by max_output_tokens ends the stream with response.incomplete (the SDK's
    get_final_response then raises, as it does against OpenAI)."""
    events = list(client.responses.create(model=MODEL, input="one two three", max_output_tokens=1, stream=True))
    assert events[-1].type == "response.incomplete" and "response.completed" not in [e.type for e in events]
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output[0].status == "incomplete" and final.output[0].content[0].text == "one "


def test_responses_are_counted_in_the_ingress_metrics(http):
    """In flight while served (a stream until its last byte), counted by status, tokens added to usage."""

    def metric(name: str) -> float:
        lines = http.get("/metrics").text.splitlines()
        return sum(
            float(line.split()[-1]) for line in lines if line.startswith(name + " ") or line.startswith(name + "{")
        )

    before = (metric("mmrag_requests_total"), metric("mmrag_completion_tokens_total"))
    http.post("/v1/responses", json={"model": MODEL, "input": "one two"})
    with http.stream("POST", "/v1/responses", json={"model": MODEL, "input": "three", "stream": True}) as response:
        list(response.iter_lines())
    http.post("/v1/responses", json={"model": MODEL, "input": "x", "temperature": 9})
    assert metric("mmrag_requests_total") - before[0] == 3
    assert metric("mmrag_completion_tokens_total") - before[1] == 3
    assert metric("mmrag_requests_in_flight") == 0
