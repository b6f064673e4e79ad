"""Pieces of the Vector Stores API on their own: the filter translation, the on/off rule, the Serve path."""

from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient

from mmrag.serving.config import MmragConfig
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from mmrag.serving.vector_stores.config import vector_stores_enabled
from mmrag.serving.vector_stores.filters import FilterError, to_milvus
from tests.vector_stores.conftest import MODEL

A = 'metadata["attributes"]'


@pytest.mark.parametrize(
    ("filters", "expression"),
    [
        ({"type": "eq", "key": "k", "value": "v"}, f'{A}["k"] == "v"'),
        ({"type": "gte", "key": "n", "value": 3}, f'{A}["n"] >= 3'),
        ({"type": "ne", "key": "b", "value": True}, f'{A}["b"] != true'),
        ({"type": "in", "key": "k", "value": ["a", 2.5]}, f'({A}["k"] == "a" or {A}["k"] == 2.5)'),
        ({"type": "nin", "key": "k", "value": ["a"]}, f'(not ({A}["k"] == "a"))'),
        # Quotes and backslashes stay inside their literal; a newline is escaped.
        ({"type": "eq", "key": 'a"]', "value": 'x" or "1"=="1\n'}, f'{A}["a\\"]"] == "x\\" or \\"1\\"==\\"1\\n"'),
        (
            {
                "type": "and",
                "filters": [{"type": "eq", "key": "k", "value": "v"}, {"type": "lt", "key": "n", "value": 1}],
            },
            f'({A}["k"] == "v" and {A}["n"] < 1)',
        ),
    ],
)
def test_filters_translate_to_quoted_expressions(filters, expression):
    assert to_milvus(filters) == expression


@pytest.mark.parametrize(
    ("filters", "where"),
    [
        ({"type": "eq", "key": "k", "value": float("nan")}, "filters.value"),
        ({"type": "eq", "key": "k", "value": 2**60}, "filters.value"),
        ({"type": "in", "key": "k", "value": ["x"] * 65}, "filters.value"),
        ({"type": "or", "filters": [{"type": "eq", "key": "k", "value": "v"}] * 65}, "filters.filters[64]"),
        ({"type": "and", "filters": [{"type": "eq", "key": "k" * 65, "value": 1}]}, "filters.filters[0].key"),
        ({"type": "eq", "key": "k", "value": "\x1b[31m"}, "filters.value"),
    ],
)
def test_filters_refused_say_where(filters, where):
    with pytest.raises(FilterError) as caught:
        to_milvus(filters)
    assert str(caught.value).startswith(where)


def test_vector_stores_need_one_retriever_replica(tmp_path):
    from mmrag.deployments.retriever import retriever_options

    several = {
        "retrieval": {"uri": "http://milvus:19530"},
        "deployments": {"retriever": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}}},
    }
    assert vector_stores_enabled(MmragConfig()) is True  # one replica (Milvus Lite): on
    assert vector_stores_enabled(MmragConfig.model_validate(several)) is False  # several: off by default
    retriever_options(MmragConfig.model_validate(several))
    with pytest.raises(ValueError, match="one retriever replica"):
        retriever_options(MmragConfig.model_validate({**several, "vector_stores": {"enabled": True}}))


def test_disabled_vector_stores_answer_404_and_chat_400(config, make_stage, engine):
    config = config.model_copy(update={"vector_stores": config.vector_stores.model_copy(update={"enabled": False})})
    stage = make_stage(config)
    with TestClient(create_app(config, LocalBackend(engine, stage))) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        with pytest.raises(openai.NotFoundError) as caught:
            client.vector_stores.create(name="x")
        assert caught.value.body["code"] == "vector_stores_disabled"
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "q"}],
                extra_body={"retrieval": {"vector_store_ids": ["vs_x"]}},
            )
        assert caught.value.body["param"] == "retrieval.vector_store_ids"


@pytest.mark.slow
def test_vector_stores_through_a_serve_handle(config, tmp_path):
    """The ingress's ServeBackend reaches the retriever replica's service; its 404s cross the handle intact."""
    import asyncio
    import time

    ray = pytest.importorskip("ray")
    from ray import serve

    from mmrag.deployments.ingress import ServeBackend
    from mmrag.deployments.retriever import RetrieverServer, retriever_options
    from mmrag.serving.errors import NotFoundError
    from mmrag.serving.files.store import FileStore
    from mmrag.serving.vector_stores import protocol as p
    from mmrag.serving.vector_stores.backend import backend_of

    file_id = FileStore(config.files).create("note.md", "assistants", b"The lighthouse keeper is called Odile.").id
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        app = RetrieverServer.options(**retriever_options(config)).bind(config.model_dump())
        handle = serve.run(app, name="vector-stores-test", route_prefix=None)
        backend = backend_of(ServeBackend(handle, handle))

        async def scenario():
            store = await backend.call("create_store", body=p.CreateStore(name="serve", file_ids=[file_id]))
            deadline = time.monotonic() + 300  # a bound against a hang, not a timing check (shared CPUs)
            while True:
                attached = await backend.call("get_file", store_id=store["id"], file_id=file_id)
                if attached["status"] != "in_progress" or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert attached["status"] == "completed", attached
            found = await backend.call("search", store_id=store["id"], body=p.Search(query="lighthouse keeper"))
            assert found["data"][0]["file_id"] == file_id
            with pytest.raises(NotFoundError) as caught:
                await backend.call("get_store", store_id="vs_nope")
            assert (caught.value.status_code, caught.value.param) == (404, "vector_store_id")

        asyncio.run(scenario())
    finally:
        if own_ray:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete("vector-stores-test")
