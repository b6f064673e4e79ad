"""Vector-store tests: the real app (fake engine) over a real RetrievalStage on a Milvus Lite file in a tmp
dir, driven by the real `openai` SDK through TestClient; the bundled MiniLM is loaded once per session."""

from __future__ import annotations

import os
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
