"""Every fault ends fast in a typed error, or in a degraded answer when configured: never a hang."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest
from pydantic import ValidationError

from mmrag.serving.pipeline import retrieval_error_as_openai
from mmrag.serving.retrieval.errors import (
    CollectionNotFoundError,
    InvalidFilterError,
    RetrievalRequestError,
    RetrievalTimeoutError,
    StoreUnreachableError,
    UnknownCollectionError,
    UnsupportedModeError,
)
from mmrag.serving.retrieval.ingest import Document, ingest_documents
from mmrag.serving.retrieval.protocol import ResolvedOptions, RetrievalOptions
from mmrag.serving.retrieval.retriever import Retriever
from mmrag.serving.retrieval.store import MilvusStore

TEXT = {"mode": "text"}


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def filled(rconfig, encoder):
    """The default collection with three documents; the store is closed again (Lite file released)."""
    store = MilvusStore(rconfig)
    docs = [Document(t, f"doc{i}.md", {}) for i, t in enumerate(["herons fish", "funicular 1898", "cheese caves"])]
    ingest_documents(docs, store, encoder, rconfig, progress=False)
    store.close()
    return rconfig


def test_healthy_retrieval(filled, encoder):
    retriever = Retriever(filled, encoder)
    result = run(retriever.retrieve(TEXT, "when did the funicular open"))
    assert result.info.documents[0].source == "doc1.md" and not result.info.degraded
    assert [c.id for c in result.chunks] == [d.id for d in result.info.documents]
    retriever.close()


def test_unreachable_server_errors_or_degrades(rconfig, encoder, unreachable_uri):
    rconfig.uri = unreachable_uri
    retriever = Retriever(rconfig, encoder)
    with pytest.raises(StoreUnreachableError) as caught:
        run(retriever.retrieve(TEXT, "anything"))
    assert caught.value.status_code == 503
    rconfig.on_failure = "degrade"
    result = run(retriever.retrieve(TEXT, "anything"))
    assert result.info.degraded and "StoreUnreachableError" in result.info.degraded_reason
    assert result.chunks == [] and result.info.documents == []
    # mode none never touches the store
    assert not run(retriever.retrieve({"mode": "none"}, "anything")).info.degraded


def test_missing_default_collection_errors_or_degrades(rconfig, encoder):
    retriever = Retriever(rconfig, encoder)  # nothing ingested: the server's own collection is missing
    with pytest.raises(CollectionNotFoundError, match=rconfig.collection) as caught:
        run(retriever.retrieve(TEXT, "q"))
    assert caught.value.status_code == 503 and caught.value.field == "retrieval.collection"
    rconfig.on_failure = "degrade"
    result = run(retriever.retrieve(TEXT, "q"))
    assert result.info.degraded and "does not exist" in result.info.degraded_reason
    assert result.info.collection == rconfig.collection
    retriever.close()


def test_a_named_collection_that_does_not_exist_is_a_404(filled, encoder):
    retriever = Retriever(filled, encoder)
    filled.on_failure = "degrade"  # the client's mistake: never degraded away
    with pytest.raises(UnknownCollectionError, match="'nope' does not exist") as caught:
        run(retriever.retrieve({"mode": "text", "collection": "nope"}, "q"))
    assert (caught.value.status_code, caught.value.field) == (404, "retrieval.collection")
    retriever.close()


@pytest.mark.parametrize(
    "expression",
    [
        "(" * 1000 + "source == 'a'" + ")" * 1000,
        "not " * 1000 + "source == 'a'",
        "metadata['x'] == " + "+".join(["1"] * 1500),  # no brackets: only the store's parser sees the depth
    ],
)
def test_a_deeply_nested_filter_is_a_400_without_internals(filled, encoder, expression):
    retriever = Retriever(filled, encoder)
    options = ResolvedOptions(mode="text", top_k=3, filter=expression, collection=filled.collection, hybrid=False)
    with pytest.raises(InvalidFilterError) as caught:  # what the store says, past the request's own check
        retriever.search(options, "q")
    assert (caught.value.status_code, caught.value.field) == (400, "retrieval.filter")
    assert caught.value.message == "the filter is nested too deeply"
    retriever.close()


def test_the_request_refuses_deep_filters_before_the_store():
    with pytest.raises(ValidationError, match="nested too deeply"):
        RetrievalOptions(filter="(" * 40 + "source == 'a'" + ")" * 40)
    assert RetrievalOptions(filter="not (source like '((((%') and metadata['k'] != 1").filter


def test_a_query_with_lone_surrogates_is_a_400_on_messages(filled, encoder):
    retriever = Retriever(filled, encoder)
    with pytest.raises(RetrievalRequestError, match="not valid Unicode") as caught:
        run(retriever.retrieve(TEXT, "herons \ud800 fish"))
    assert (caught.value.status_code, caught.value.field) == (400, "messages")
    retriever.close()


def test_the_retriever_cuts_long_queries(filled, encoder, monkeypatch):
    filled.max_query_chars = 10
    retriever = Retriever(filled, encoder)
    searched: list[str] = []
    monkeypatch.setattr(retriever, "search", lambda options, query: searched.append(query) or [])
    run(retriever.retrieve(TEXT, "herons fish in reed beds"))
    assert searched == ["herons fis"]
    retriever.close()


def test_faults_tell_clients_their_kind_not_the_store_file(rconfig, encoder):
    rconfig.on_failure = "degrade"
    retriever = Retriever(rconfig, encoder)
    error = StoreUnreachableError(f"search: cannot open Milvus at {rconfig.uri}: locked")
    assert rconfig.uri not in retrieval_error_as_openai(error).message
    assert retrieval_error_as_openai(error).headers["Retry-After"]
    retriever.store().client.close()  # a broken connection: the next search fails inside pymilvus
    result = run(retriever.retrieve(TEXT, "q"))
    assert result.info.degraded and rconfig.uri not in result.info.degraded_reason
    retriever.close()


def test_collection_dropped_while_serving(filled, encoder):
    retriever = Retriever(filled, encoder)
    assert run(retriever.retrieve(TEXT, "herons")).info.documents
    retriever.store().client.drop_collection(filled.collection)
    with pytest.raises(CollectionNotFoundError):
        run(retriever.retrieve(TEXT, "herons"))
    retriever.close()


def test_search_timeout_end_to_end(filled, encoder):
    filled.search_timeout_s = 1e-6  # encoding alone takes longer
    retriever = Retriever(filled, encoder)
    with pytest.raises(RetrievalTimeoutError) as caught:
        run(retriever.retrieve(TEXT, "herons"))
    assert caught.value.status_code == 503
    filled.on_failure = "degrade"
    assert "RetrievalTimeoutError" in run(retriever.retrieve(TEXT, "herons")).info.degraded_reason
    retriever.close()


def test_milvus_deadline_is_a_timeout(filled, encoder, monkeypatch):
    """A gRPC DEADLINE_EXCEEDED from Milvus becomes a 503 timeout error.

    Milvus Lite 3.2.2 does not enforce gRPC deadlines on searches (a 1e-9 s deadline still returns
    results), so the deadline is injected at the client; the request-level limit, which does hold with
    Lite, is tested end to end in ``test_search_timeout_end_to_end``.
    """
    import grpc

    class Deadline(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.DEADLINE_EXCEEDED

    store = MilvusStore(filled)
    store.count(filled.collection)

    def expired(*args, **kwargs):
        raise Deadline()

    monkeypatch.setattr(store.client, "search", expired)
    with pytest.raises(RetrievalTimeoutError, match="timed out") as caught:
        store.search(filled.collection, encoder.encode(["x"])[0], "x", 3)
    assert caught.value.status_code == 503
    store.close()


def test_embedded_server_gone_then_reconnect(filled, encoder):
    from milvus_lite.server_manager import server_manager_instance

    retriever = Retriever(filled, encoder)
    assert run(retriever.retrieve(TEXT, "herons")).info.documents
    server_manager_instance.release_server(filled.resolved_uri())  # the embedded Milvus stops
    with pytest.raises(StoreUnreachableError):
        run(retriever.retrieve(TEXT, "herons"))
    # the broken connection was dropped: the next request reconnects (restarting embedded Lite)
    assert run(retriever.retrieve(TEXT, "herons")).info.documents[0].source == "doc0.md"
    retriever.close()


def test_closing_a_lite_store_closes_its_connection(rconfig):
    # A Lite server's port is recycled by later servers: a connection left open would be handed to them.
    from pymilvus.client.connection_manager import ConnectionManager

    manager = ConnectionManager.get_instance()
    before = manager.get_stats()["total_connections"]
    store = MilvusStore(rconfig)
    assert not store.has_collection("anything")
    assert manager.get_stats()["total_connections"] == before + 1
    store.close()
    assert manager.get_stats()["total_connections"] == before


def test_lite_file_held_by_another_process(filled):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys
            from pymilvus import MilvusClient
            MilvusClient({filled.resolved_uri()!r})
            print("ready", flush=True)
            sys.stdin.read()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreUnreachableError, match="one process per file"):
            MilvusStore(filled)
    finally:
        holder.communicate("", timeout=30)


def test_request_errors_are_400(filled, encoder):
    retriever = Retriever(filled, encoder)
    with pytest.raises(UnsupportedModeError) as caught:
        run(retriever.retrieve({"mode": "xrag"}, "q"))
    assert (caught.value.status_code, caught.value.field) == (400, "retrieval.mode")
    with pytest.raises(RetrievalRequestError, match="top_k") as caught:
        run(retriever.retrieve({"mode": "text", "top_k": filled.max_top_k + 1}, "q"))
    assert caught.value.field == "retrieval.top_k"
    filled.on_failure = "degrade"  # request errors are never degraded away
    with pytest.raises(RetrievalRequestError) as caught:
        run(retriever.retrieve({"mode": "text", "filter": "nosuch == 1"}, "q"))
    assert caught.value.field == "retrieval.filter"
    retriever.close()


def test_only_allowed_collections_can_be_named(filled, encoder):
    filled.allowed_collections = ["other_docs"]
    retriever = Retriever(filled, encoder)
    with pytest.raises(RetrievalRequestError, match="allowed_collections") as caught:
        run(retriever.retrieve({"mode": "text", "collection": "secret_docs"}, "q"))
    assert (caught.value.status_code, caught.value.field) == (400, "retrieval.collection")
    assert run(retriever.retrieve({"mode": "text"}, "bridge")).chunks  # the default collection stays allowed
    with pytest.raises(UnknownCollectionError):  # an allowed name reaches Milvus (not created here)
        run(retriever.retrieve({"mode": "text", "collection": "other_docs"}, "q"))
    retriever.close()


def test_error_messages_do_not_leak_credentials(rconfig, encoder, unreachable_uri):
    rconfig.uri = unreachable_uri.replace("http://", "http://root:s3cret@")
    with pytest.raises(StoreUnreachableError) as caught:
        run(Retriever(rconfig, encoder).retrieve(TEXT, "anything"))
    assert "s3cret" not in str(caught.value) and unreachable_uri in str(caught.value)
