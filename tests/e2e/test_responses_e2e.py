"""The Responses API on the default server as a user gets it: `mmrag serve` (Ray Serve, smol on vLLM, Milvus
Lite), documents in through the Files and Vector Stores APIs, then `responses.create` and `responses.stream`
with file_search. The ingress reaches the engine and the vector stores through deployment handles here,
so the citations come from what the engine reports across the handle."""

from __future__ import annotations

import openai
import pytest

from tests.responses.conftest import DOCS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "smol"
QUESTION = "When did the Harrowgate funicular open?"


@pytest.fixture(scope="module")
def client(default_client):
    return default_client  # the session's default server, shared with the other tests of it


@pytest.fixture(scope="module")
def store(client):
    created = client.vector_stores.create(name="facts")
    ids = {}
    for name, data in DOCS.items():
        ids[name] = client.files.create(file=(name, data), purpose="assistants").id
        attached = client.vector_stores.files.create_and_poll(file_id=ids[name], vector_store_id=created.id)
        assert attached.status == "completed", attached.last_error
    return created.id, ids


def test_the_answer_comes_from_the_file_it_cites(client, store):
    store_id, ids = store
    tool = {"type": "file_search", "vector_store_ids": [store_id], "max_num_results": 1}
    response = client.responses.create(
        model=MODEL,
        input=QUESTION,
        max_output_tokens=40,
        temperature=0,
        tools=[tool],
        include=["file_search_call.results"],
    )
    call, message = response.output
    assert call.status == "completed" and call.results[0].file_id == ids["trains.txt"]
    assert "1898" in response.output_text, response.output_text
    assert [(a.file_id, a.index) for a in message.content[0].annotations] == [
        (ids["trains.txt"], len(response.output_text))
    ]
    with client.responses.stream(
        model=MODEL, input=QUESTION, max_output_tokens=60, temperature=0, tools=[tool]
    ) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types[2:7] == [
        "response.output_item.added",
        "response.file_search_call.in_progress",
        "response.file_search_call.searching",
        "response.file_search_call.completed",
        "response.output_item.done",
    ]
    assert types[-1] == "response.completed" and "1898" in final.output_text
    assert final.output[1].content[0].annotations[0].filename == "trains.txt"


def test_unknown_store_is_a_404(client):
    tool = {"type": "file_search", "vector_store_ids": ["vs_nope"]}
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model=MODEL, input=QUESTION, tools=[tool])
    assert caught.value.body["param"] == "tools[0].vector_store_ids"
