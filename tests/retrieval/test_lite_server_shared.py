"""Several processes on one Milvus Lite path through the Lite server that `mmrag serve` runs: a retriever in
this process and another process (a plain store, and `mmrag ingest` itself) write and read each other's rows,
and what differs on Lite (BM25 inside hybrid search, delete answering ids) still works through the server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmrag.serving.retrieval.ingest import ingest_paths
from mmrag.serving.retrieval.lite_server import LiteServer
from mmrag.serving.retrieval.store import MilvusStore

# Another process: finds the server by the state file beside the Lite path, writes a collection of its own
# and counts the rows this process wrote.
CHILD = """
import json, sys
from mmrag.serving.retrieval.config import RetrievalConfig
from mmrag.serving.retrieval.store import MilvusStore

class Stub:
    name, dim = "stub-encoder", 4

store = MilvusStore(RetrievalConfig(uri=sys.argv[1]))
store.create_collection("from_child", Stub())
row = {"id": "k1", "text": "Kestrels hover over the Harrowgate cliffs.", "source": "child.md", "metadata": {}}
store.upsert("from_child", [row | {"dense": [1.0, 0.0, 0.0, 0.0]}])
store.flush("from_child")
print(json.dumps({"server": store.lite_server, "parent_rows": store.count(sys.argv[2])}))
store.close()
"""


@pytest.fixture
def lite(tmp_path: Path):
    server = LiteServer(tmp_path / "milvus.db")
    server.start()
    yield server
    server.stop()


def child_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_two_processes_write_and_read_through_one_server(lite, corpus_dir, encoder, rconfig):
    store = MilvusStore(rconfig)  # rconfig's path is the server's: the state file leads here
    try:
        assert store.lite_server == lite.uri
        summary = ingest_paths([corpus_dir], store, encoder, rconfig, source_root=corpus_dir.parent, progress=False)
        assert summary.new_chunks == 5
        done = subprocess.run(
            [sys.executable, "-c", CHILD, rconfig.uri, rconfig.collection],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout.splitlines()[-1]) == {"server": lite.uri, "parent_rows": 5}
        assert store.count("from_child") == 1  # the other process's write, read here
        (hit,) = store.search("from_child", [1.0, 0.0, 0.0, 0.0], "kestrels", 1)
        assert hit.source == "child.md"

        # Hybrid search (dense + the collection's BM25 function, fused with RRF) through the server.
        query = "ZQX-4471"
        hits = store.search(rconfig.collection, encoder.encode([query], is_query=True)[0], query, 3, hybrid=True)
        assert "ZQX-4471" in hits[0].text
        filtered = store.search(
            rconfig.collection, encoder.encode([query])[0], query, 3, 'metadata["lang"] == "fr"', hybrid=True
        )
        assert [h.metadata["lang"] for h in filtered] == ["fr"]
        # Milvus Lite answers a delete with the ids, a server with a count: both are a count here.
        assert store.delete_source(rconfig.collection, "docs/trains.txt") == 1
        assert store.count(rconfig.collection) == 4
    finally:
        store.close()


@pytest.mark.slow
def test_mmrag_ingest_writes_through_the_server_while_a_retriever_reads(lite, corpus_dir, encoder, rconfig):
    """The user story: `mmrag serve` in one terminal (here its server and a retriever on it), `mmrag ingest
    ./docs` in another, and the retriever finds the new documents at once."""
    from mmrag.serving.retrieval.protocol import RetrievalOptions
    from mmrag.serving.retrieval.retriever import Retriever

    config = rconfig.model_copy(update={"lite_server_uri": lite.uri})  # as `mmrag serve` gives its replicas
    retriever = Retriever(config, encoder=encoder)
    try:
        retriever.check_health()
        command = [sys.executable, "-m", "mmrag.serving.cli", "ingest", str(corpus_dir), "--no-progress"]
        done = subprocess.run(
            [*command, "--set", f"retrieval.uri={rconfig.uri}"],
            capture_output=True,
            text=True,
            env=child_env(),
            cwd=corpus_dir.parent,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"through the Milvus Lite server at {lite.uri}" in done.stderr
        options = RetrievalOptions(mode="text", top_k=1)
        result = asyncio.run(retriever.retrieve(options, "Where does the grey heron of Vellmora nest?"))
        assert [c.source for c in result.chunks] == ["docs/herons.md"]
    finally:
        retriever.close()
