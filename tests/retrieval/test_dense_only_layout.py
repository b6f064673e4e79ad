"""The dense-only collection layout (``retrieval.full_text: false``, for Milvus 2.3/2.4) on Milvus Lite, and
the partition-key workaround for Milvus before 2.3.10; ``test_real_milvus.py`` runs both on a real Milvus 2.3."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from mmrag.serving.retrieval.config import RetrievalConfig
from mmrag.serving.retrieval.errors import RetrievalRequestError
from mmrag.serving.retrieval.ingest import ingest_paths
from mmrag.serving.retrieval.store import MilvusStore


def test_hybrid_default_needs_full_text():
    with pytest.raises(ValidationError, match="hybrid: true needs full_text: true"):
        RetrievalConfig(full_text=False, hybrid=True)
    assert RetrievalConfig().full_text and not RetrievalConfig(full_text=False).hybrid


@pytest.fixture
def dense_store(tmp_path: Path):
    config = RetrievalConfig(uri=str(tmp_path / "milvus.db"), ingest_demo_corpus=False, full_text=False)
    store = MilvusStore(config)
    yield store
    store.close()


def test_dense_only_collection_searches_and_refuses_hybrid(dense_store, encoder, corpus_dir):
    config = dense_store.config
    summary = ingest_paths([corpus_dir], dense_store, encoder, config, source_root=corpus_dir, progress=False)
    assert summary.new_chunks == 5
    described = dense_store.client.describe_collection(config.collection)
    assert {f["name"] for f in described["fields"]} == {"id", "text", "source", "metadata", "dense"}
    assert dense_store.properties(config.collection)["mmrag.full_text"] == "false"
    assert dense_store._fresh(config.collection) == {}  # Lite reads its own writes: no consistency level asked
    query = "Where does the grey heron nest?"
    vector = encoder.encode([query], is_query=True)[0]
    assert dense_store.search(config.collection, vector, query, 2)[0].source == "herons.md"
    with pytest.raises(RetrievalRequestError) as refused:
        dense_store.search(config.collection, vector, query, 2, hybrid=True)
    assert (refused.value.status_code, refused.value.field) == (400, "retrieval.hybrid")
    # The layout is the collection's (its properties): with full text configured now, it is still dense-only.
    full = MilvusStore(config.model_copy(update={"full_text": True}))
    try:
        with pytest.raises(RetrievalRequestError, match="dense-only"):
            full.search(config.collection, vector, query, 2, hybrid=True)
    finally:
        full.close()


@pytest.mark.parametrize(
    ("version", "misroutes"),
    [("v2.3.5-lite", True), ("v2.2.14", True), ("v2.3.10", False), ("v2.5.4", False), ("milvus_lite-3.2.2", False)],
)
def test_which_servers_misroute_upserts_by_partition_key(store, monkeypatch, version, misroutes):
    monkeypatch.setattr(store, "server_version", lambda: version)
    assert store._upsert_misroutes_partition_key() is misroutes


def test_vector_store_collection_without_partition_key_on_old_milvus(store, rconfig, encoder, monkeypatch):
    monkeypatch.setattr(store, "server_version", lambda: "v2.3.5-lite")
    store.create_collection(rconfig.collection, encoder, vector_store_partitions=4)
    fields = {f["name"]: f for f in store.client.describe_collection(rconfig.collection)["fields"]}
    assert "vector_store_id" in fields and not fields["vector_store_id"].get("is_partition_key")
    assert store.properties(rconfig.collection)["mmrag.partition_key"] == "false"
