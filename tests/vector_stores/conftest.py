"""Vector-store tests: the real app (fake engine) over a real RetrievalStage on a Milvus Lite file in a tmp
dir, driven by the real `openai` SDK through TestClient; the bundled MiniLM is loaded once per session."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from mmrag.serving.config import MmragConfig
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from tests.batch.engines import RetrievalEchoEngine

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = "smol"  # the default config's served name (a fake engine answers)
REPO = Path(__file__).resolve().parents[2]


@contextmanager
def serve_application(tmp_path: Path, name: str, **sections) -> Iterator[tuple[str, MmragConfig]]:
    """The whole Serve application (ingress, retriever, LLM with a fake engine) on a free loopback port, on
    Milvus Lite and a files directory in ``tmp_path``; yields its ``/v1`` URL and its config."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from mmrag.deployments.app import build_application

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = MmragConfig.model_validate(
        {
            "retrieval": {"uri": str(tmp_path / "milvus.db"), "ingest_demo_corpus": False, "default_mode": "none"},
            "files": {"directory": str(tmp_path / "files")},
            "vector_stores": {"poll_after_ms": 50},
            **sections,
        }
    )
    own_ray = not ray.is_initialized()
    if own_ray:
        env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_application(config, engine_cls="tests.batch.engines:RetrievalEchoEngine")
        serve.run(app, name=name, route_prefix="/")
        yield f"http://127.0.0.1:{port}/v1", config
    finally:
        if own_ray:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(name)


@pytest.fixture(scope="session")
def encoder():
    from mmrag.serving.retrieval.config import EncoderConfig
    from mmrag.serving.retrieval.encoders import load_encoder

    return load_encoder(EncoderConfig())


@pytest.fixture
def config(tmp_path: Path) -> MmragConfig:
    return MmragConfig.model_validate(
        {
            "retrieval": {"uri": str(tmp_path / "milvus.db"), "ingest_demo_corpus": False, "default_mode": "none"},
            "files": {"directory": str(tmp_path / "files")},
            "vector_stores": {"poll_after_ms": 20},
        }
    )


@pytest.fixture
def make_stage(encoder, monkeypatch):
    """A RetrievalStage on the shared encoder; closed (Lite file released, jobs joined) at the end."""
    from mmrag.serving.retrieval import retriever as retriever_module
    from mmrag.serving.retrieval.stage import RetrievalStage

    monkeypatch.setattr(retriever_module, "load_encoder", lambda _config: encoder)
    made = []

    def make(config: MmragConfig) -> RetrievalStage:
        made.append(RetrievalStage(config))
        return made[-1]

    yield make
    for stage in made:
        close_stage(stage)


def close_stage(stage) -> None:
    if stage._vector_stores is not None:
        stage._vector_stores.close()
        stage._vector_stores = None
    stage.core.close()


@pytest.fixture
def stage(config, make_stage):
    return make_stage(config)


@pytest.fixture
def engine(config):
    return RetrievalEchoEngine(config)


@pytest.fixture
def http(config, engine, stage):
    with TestClient(create_app(config, LocalBackend(engine, stage))) as client:
        yield client


@pytest.fixture
def client(http) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
