"""Against a real Milvus server, not Milvus Lite: the dense-only layout (``retrieval.full_text: false``) on
Milvus 2.3, the one real Milvus installable from a package here (``pip install milvus==2.3.5`` gives
``milvus-server``). Ingestion and retrieval through the retriever, a vector store's file attached and searched
through the Vector Stores API (real ``openai`` SDK, fake engine), and what 2.3 refuses.

Skipped unless ``MMRAG_MILVUS_SERVER`` names the ``milvus-server`` executable (install it into a venv of its
own, not the project's: it pins another pymilvus)::

    python -m venv /tmp/milvus23 && /tmp/milvus23/bin/pip install milvus==2.3.5
    MMRAG_MILVUS_SERVER=/tmp/milvus23/bin/milvus-server .venv/bin/python -m pytest tests/retrieval/test_real_milvus.py

The server gets a data directory of its own (removed at the end), its proxy and etcd client ports on free ports
and every component's address on loopback; Milvus 2.3 still binds its gRPC ports on all interfaces and etcd's
peer port 2380 is fixed, so one such server runs per machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from mmrag.serving.config import MmragConfig
from mmrag.serving.retrieval.config import RetrievalConfig
from mmrag.serving.retrieval.errors import RetrievalRequestError, RetrievalUnavailableError

pytestmark = pytest.mark.slow  # a server start (10-60 s on a loaded machine) and a few collections

SERVER_ENV = "MMRAG_MILVUS_SERVER"
READY_TIMEOUT_S = 180.0
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory) -> Iterator[str]:
    """A Milvus server from ``$MMRAG_MILVUS_SERVER`` on a fresh data directory; stopped and removed after."""
    executable = os.environ.get(SERVER_ENV)
    if not executable:
        pytest.skip(f"{SERVER_ENV} is not set (the path of a `milvus-server` from `pip install milvus==2.3.5`)")
    if not os.access(executable, os.X_OK):
        pytest.fail(f"{SERVER_ENV}={executable} is not an executable")
    if port_taken(2380):  # embedded etcd's peer port, which milvus-server cannot move
        pytest.skip("port 2380 is in use (another Milvus or etcd): milvus-server's embedded etcd needs it")
    data = tmp_path_factory.mktemp("milvus-server")
    port = free_port()
    command = [executable, "--data", str(data), "--proxy-port", str(port), "--etcd-port", str(free_port())]
    for component in COMPONENTS:
        command += ["--extra-config", f"{component}.ip=127.0.0.1"]
    log = (data / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", server, data)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)
        log.close()
        shutil.rmtree(data, ignore_errors=True)


def wait_ready(uri: str, server: subprocess.Popen, data: Path) -> None:
    from pymilvus import MilvusClient

    deadline = time.monotonic() + READY_TIMEOUT_S
    error: Exception | None = None
    while time.monotonic() < deadline:
        if server.poll() is not None:
            break
        try:
            client = MilvusClient(uri=uri, timeout=5)
            try:
                client.list_collections(timeout=5)
                return
            finally:
                client.close()
        except Exception as exc:  # not listening yet, or its coordinators not up yet
            error = exc
            time.sleep(1)
    tail = (data / "server.log").read_text(errors="replace")[-2000:]
    pytest.fail(f"milvus-server did not answer at {uri} (exit {server.poll()}; last error {error}):\n{tail}")


def stop(server: subprocess.Popen) -> None:
    """SIGINT: milvus-server's wrapper stops its milvus process and exits; its whole group is killed if not."""
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):  # a child left behind (the wrapper exited, or was stuck)
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=10)


@pytest.fixture
def rconfig(milvus_uri: str, request) -> RetrievalConfig:
    """A dense-only retrieval config on the server, a collection of this test's own."""
    return RetrievalConfig(
        uri=milvus_uri, full_text=False, collection=f"t_{request.node.name[:40]}", ingest_demo_corpus=False
    )


@pytest.fixture
def store(rconfig):
    from mmrag.serving.retrieval.store import MilvusStore

    s = MilvusStore(rconfig)
    yield s
    if s.has_collection(rconfig.collection):
        s.drop(rconfig.collection)
    s.close()


def test_ingest_and_retrieve_dense_only(store, rconfig, encoder, corpus_dir):
    import asyncio

    from mmrag.serving.retrieval.ingest import ingest_paths
    from mmrag.serving.retrieval.retriever import Retriever

    summary = ingest_paths([corpus_dir], store, encoder, rconfig, source_root=corpus_dir, progress=False)
    assert (summary.files, summary.chunks, summary.new_chunks) == (3, 5, 5)
    assert store.properties(rconfig.collection)["mmrag.full_text"] == "false"
    again = ingest_paths([corpus_dir], store, encoder, rconfig, source_root=corpus_dir, progress=False)
    assert again.new_chunks == 0 and store.count(rconfig.collection) == 5  # ids hash content: nothing rewritten

    retriever = Retriever(rconfig, encoder)
    try:
        result = asyncio.run(retriever.retrieve({"top_k": 2}, "Where does the grey heron nest?"))
        assert result.chunks[0].source == "herons.md" and "reed beds" in result.chunks[0].text
        french = asyncio.run(retriever.retrieve({"filter": 'metadata["lang"] == "fr"'}, "cheese"))
        assert [c.text for c in french.chunks] == ["Le fromage Blue Gorse vieillit quatorze semaines."]
        with pytest.raises(RetrievalRequestError) as refused:
            asyncio.run(retriever.retrieve({"hybrid": True}, "Where does the grey heron nest?"))
        assert (refused.value.status_code, refused.value.field) == (400, "retrieval.hybrid")
        assert "dense-only" in refused.value.message
    finally:
        retriever.close()
    assert store.delete_source(rconfig.collection, "herons.md") == 1


def test_default_layout_is_refused_with_the_setting_to_change(milvus_uri, encoder, request):
    from mmrag.serving.retrieval.store import MilvusStore

    config = RetrievalConfig(uri=milvus_uri, collection="t_full_text", ingest_demo_corpus=False)
    store = MilvusStore(config)
    try:
        with pytest.raises(RetrievalUnavailableError) as refused:
            store.create_collection(config.collection, encoder)
        assert "retrieval.full_text: false" in refused.value.message and "2.3" in refused.value.message
        assert not store.has_collection(config.collection)
    finally:
        store.close()


def test_vector_store_attach_search_and_chat(milvus_uri, encoder, tmp_path, monkeypatch):
    from mmrag.serving.openai.server import create_app
    from mmrag.serving.pipeline import LocalBackend
    from mmrag.serving.retrieval import retriever as retriever_module
    from mmrag.serving.retrieval.stage import RetrievalStage
    from tests.batch.engines import RetrievalEchoEngine
    from tests.vector_stores.conftest import MODEL, close_stage

    monkeypatch.setattr(retriever_module, "load_encoder", lambda _config: encoder)
    config = MmragConfig.model_validate(
        {
            "retrieval": {"uri": milvus_uri, "full_text": False, "ingest_demo_corpus": False, "default_mode": "none"},
            "files": {"directory": str(tmp_path / "files")},
            "vector_stores": {"poll_after_ms": 50, "records_path": str(tmp_path / "records.sqlite3")},
        }
    )
    stage = RetrievalStage(config)
    engine = RetrievalEchoEngine(config)
    try:
        with TestClient(create_app(config, LocalBackend(engine, stage))) as http:
            client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
            herons = client.files.create(
                file=("herons.md", b"# Herons\n\nThe grey heron of Vellmora nests in reed beds.\n"),
                purpose="assistants",
            )
            trains = client.files.create(
                file=("trains.txt", b"The Harrowgate funicular opened in 1898 and climbs 212 metres.\n"),
                purpose="assistants",
            )
            first, second = client.vector_stores.create(name="birds"), client.vector_stores.create(name="rail")
            for store_id, file_id in ((first.id, herons.id), (second.id, trains.id)):
                attached = client.vector_stores.files.create_and_poll(
                    file_id=file_id, vector_store_id=store_id, attributes={"kind": "fact"}
                )
                assert attached.status == "completed", attached.last_error
            # Each store finds its own file, and only it (a scoped search on Milvus 2.3: see store.py).
            hits = client.vector_stores.search(first.id, query="Which bird nests in reed beds?").data
            assert [h.file_id for h in hits] == [herons.id] and "grey heron" in hits[0].content[0].text
            hits = client.vector_stores.search(second.id, query="Which bird nests in reed beds?").data
            assert [h.file_id for h in hits] == [trains.id]
            filtered = client.vector_stores.search(
                first.id, query="heron", filters={"type": "eq", "key": "kind", "value": "other"}
            )
            assert filtered.data == []
            # New attributes rewrite the chunks (an upsert of the same ids): still found, by the new value.
            client.vector_stores.files.update(file_id=herons.id, vector_store_id=first.id, attributes={"kind": "bird"})
            hits = client.vector_stores.search(
                first.id, query="heron", filters={"type": "eq", "key": "kind", "value": "bird"}
            ).data
            assert [h.file_id for h in hits] == [herons.id]

            response = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "When did the Harrowgate funicular open?"}],
                extra_body={"retrieval": {"vector_store_ids": [first.id, second.id], "top_k": 1}},
            )
            assert [d["file_id"] for d in response.model_extra["retrieval"]["documents"]] == [trains.id]
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "When did the Harrowgate funicular open?"}],
                    extra_body={"retrieval": {"vector_store_ids": [first.id], "hybrid": True}},
                )
            assert refused.value.body["param"] == "retrieval.hybrid"

            client.vector_stores.files.delete(file_id=herons.id, vector_store_id=first.id)
            assert client.vector_stores.search(first.id, query="grey heron").data == []
    finally:
        close_stage(stage)
        from mmrag.serving.retrieval.store import MilvusStore

        cleanup = MilvusStore(config.retrieval)
        try:
            cleanup.drop(config.vector_stores.collection)
        finally:
            cleanup.close()
