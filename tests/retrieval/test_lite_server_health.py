"""``/health`` while the Milvus Lite server that ``mmrag serve`` supervises dies and is restarted: 503 naming
retrieval while it is down, 200 again once it answers on its port, and searches work again at once (the
restart loads the collections again). The real app (fake engine) over a real retriever stage, the real
``milvus-lite server``; no Ray, no vLLM."""

from __future__ import annotations

import os
import signal

import pytest
from fastapi.testclient import TestClient

from mmrag.serving.config import MmragConfig
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from mmrag.serving.retrieval.lite_server import LiteServer
from tests.fake_engine import FakeEngine


@pytest.mark.slow  # two Lite server starts, an encoder and a collection: 10 s measured on a busy machine
def test_health_names_retrieval_while_the_lite_server_is_down(tmp_path, encoder, monkeypatch):
    from mmrag.serving.retrieval import retriever as retriever_module
    from mmrag.serving.retrieval.stage import RetrievalStage

    monkeypatch.setattr(retriever_module, "load_encoder", lambda _config: encoder)
    lite = LiteServer(tmp_path / "milvus.db")
    lite.start()
    stage = None
    try:
        # What `mmrag serve` gives its replicas: the Lite path and the server that serves it.
        retrieval = {"uri": str(lite.data_dir), "lite_server_uri": lite.uri, "ingest_demo_corpus": False}
        config = MmragConfig.model_validate({"retrieval": retrieval, "files": {"directory": str(tmp_path / "files")}})
        stage = RetrievalStage(config)
        with TestClient(create_app(config, LocalBackend(FakeEngine(config), stage))) as http:
            assert http.get("/health").status_code == 200
            store = http.post("/v1/vector_stores", json={"name": "s"}).json()["id"]
            search = f"/v1/vector_stores/{store}/search"
            assert http.post(search, json={"query": "q"}).json()["data"] == []  # a store with no file yet
            os.kill(lite.pid, signal.SIGKILL)
            lite.process.wait()
            down = http.get("/health")
            assert down.status_code == 503 and "retry-after" in down.headers
            error = down.json()["error"]
            assert error["type"] == "service_unavailable"
            assert error["message"].startswith(f"not ready: retrieval: the Milvus Lite server ({lite.uri})")
            assert lite.ensure_running(max_restarts=1)  # what `mmrag serve` does within a second
            assert http.get("/health").status_code == 200
            # The restarted server has its collections released; the restart loaded them again, so the
            # stage's connection (which loaded them once) searches at once.
            assert http.post(search, json={"query": "q"}).status_code == 200
    finally:
        if stage is not None:
            stage._vector_stores.close()
            stage.core.close()
        lite.stop()


def test_a_milvus_server_or_an_in_process_lite_path_is_not_probed(tmp_path):
    for retrieval in ({"uri": "http://127.0.0.1:1"}, {"uri": str(tmp_path / "milvus.db")}):
        config = MmragConfig.model_validate({"retrieval": retrieval})
        with TestClient(create_app(config, LocalBackend(FakeEngine(config)))) as http:
            assert http.get("/health").status_code == 200, retrieval
