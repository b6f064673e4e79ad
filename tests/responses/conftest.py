"""Responses API tests: the real app over a real RetrievalStage (Milvus Lite in a tmp dir, the bundled MiniLM)
with a fake engine that builds the text-RAG prompt as the vLLM engine does, driven by the real `openai` SDK
through TestClient. One app and one filled vector store per module (a stage costs seconds to open)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator

import openai
import pytest
from fastapi.testclient import TestClient

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.protocol import GenerationDelta, GenerationRequest
from mmrag.serving.errors import InvalidRequestError
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from mmrag.serving.retrieval.protocol import build_text_rag_messages
from tests.fake_engine import FakeEngine
from tests.vector_stores.conftest import close_stage

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = "smol"  # the default config's served name

DOCS = {
    "herons.md": b"# Herons\n\nThe grey heron of Vellmora nests in reed beds and eats mostly small fish.\n",
    "trains.txt": b"The Harrowgate funicular opened in 1898 and climbs 212 metres up the cliff.\n",
}
ATTRIBUTES = {"herons.md": {"topic": "birds", "year": 2019}, "trains.txt": {"topic": "rail", "year": 1898}}


class WordTokenizer:
    """Words as tokens: enough for the text-RAG budget in a test."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return text.split()

    def decode(self, ids: list[str]) -> str:
        return " ".join(ids)


class RagEchoEngine(FakeEngine):
    """The fake engine (it echoes the last user text), after doing with retrieval what the vLLM engine does:
    chunks enter the prompt through ``build_text_rag_messages`` (placed before the user text in these tests'
    config, so the echo shows them) and the first delta carries the retrieval info. A user text of ``fail``
    streams one word, then fails as an engine error would."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        info = None
        if request.retrieval is not None:
            text_rag = self.config.retrieval.text_rag
            messages = build_text_rag_messages(
                request.messages, request.retrieval, WordTokenizer(), text_rag.max_context_tokens, text_rag
            )
            request = dataclasses.replace(request, messages=messages)
            info = request.retrieval.info
        async for delta in super().generate(request):
            if delta.text == "fail ":
                yield delta
                raise InvalidRequestError("the engine refused the prompt", param="messages")
            yield dataclasses.replace(delta, retrieval=info)
            info = None


@pytest.fixture(scope="session")
def encoder():
    from mmrag.serving.retrieval.config import EncoderConfig
    from mmrag.serving.retrieval.encoders import load_encoder

    return load_encoder(EncoderConfig())


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> MmragConfig:
    root = tmp_path_factory.mktemp("responses")
    return MmragConfig.model_validate(
        {
            "retrieval": {
                "uri": str(root / "milvus.db"),
                "ingest_demo_corpus": False,
                "default_mode": "none",
                "text_rag": {"placement": "user"},
            },
            "files": {"directory": str(root / "files")},
            "vector_stores": {"poll_after_ms": 20},
            "limits": {"image_url_schemes": ["data"], "max_images_per_request": 2},
        }
    )


@pytest.fixture(scope="module")
def stage(config, encoder):
    from mmrag.serving.retrieval import retriever as retriever_module
    from mmrag.serving.retrieval.stage import RetrievalStage

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(retriever_module, "load_encoder", lambda _config: encoder)
        made = RetrievalStage(config)
        yield made
    close_stage(made)


@pytest.fixture(scope="module")
def engine(config):
    return RagEchoEngine(config)


@pytest.fixture(scope="module")
def http(config, engine, stage):
    with TestClient(create_app(config, LocalBackend(engine, stage))) as client:
        yield client


@pytest.fixture(scope="module")
def client(http) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


@pytest.fixture(scope="module")
def store(client) -> tuple[str, dict[str, str]]:
    """A vector store with herons.md and trains.txt indexed (with attributes): (store id, file ids by name)."""
    created = client.vector_stores.create(name="facts")
    ids = {}
    for name, data in DOCS.items():
        ids[name] = client.files.create(file=(name, data), purpose="assistants").id
        attached = client.vector_stores.files.create_and_poll(
            file_id=ids[name], vector_store_id=created.id, attributes=ATTRIBUTES[name]
        )
        assert attached.status == "completed", attached.last_error
    return created.id, ids
