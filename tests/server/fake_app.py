"""What the chat-feature tests over the real app and a fake engine share (structured outputs, tool calls, tool
choice auto): one app per module, the per-test fixtures over it, request and response helpers.

The fake engine echoes the last user text word by word, so a test sends the output it wants the "model" to
produce; what the engine was asked is read from ``engine.seen`` (cleared before each test).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.protocol import GenerationDelta
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from mmrag.serving.retrieval.protocol import RetrievalInfo, RetrievalResult, RetrievedChunk, RetrievedDocument
from tests.fake_engine import FakeEngine

MODEL = "smol"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


class OneDocument:
    """A retriever that always finds the same document."""

    async def retrieve(self, options, query_text):
        chunk = RetrievedChunk(id="d1", score=0.9, text="Paris is in France.", source="facts.txt")
        info = RetrievalInfo(mode="text", documents=[RetrievedDocument(id="d1", score=0.9, source="facts.txt")])
        return RetrievalResult(chunks=[chunk], info=info)


def app_fixtures(config: dict[str, Any], retriever: Any = None) -> tuple[Any, Any, Any, Any]:
    """``served`` (one app for the module: building one costs more than most tests), and per test ``engine``
    (what it saw cleared), ``http`` (a TestClient) and ``client`` (the `openai` SDK over it). Assign them to
    module globals of the same names: ``served, engine, http, client = app_fixtures({...})``."""

    @pytest.fixture(scope="module")
    def served():
        engine = FakeEngine(MmragConfig.model_validate(config))
        with TestClient(create_app(engine.config, LocalBackend(engine, retriever))) as http:
            yield engine, http

    @pytest.fixture
    def engine(served):
        served[0].seen.clear()
        return served[0]

    @pytest.fixture
    def http(served, engine):
        return served[1]

    @pytest.fixture
    def client(http):
        return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)

    return served, engine, http, client


def chat(text: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def assert_error(response, param: str, fragment: str = "") -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error"), error
    assert fragment in error["message"], error


def sse_chunks(response) -> list[dict[str, Any]]:
    lines = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def engine_deltas(pieces: list[str], retrieval: Any) -> list[GenerationDelta]:
    """One choice's deltas as an engine sends them: ``retrieval`` on the first, counts growing, ``stop`` last."""
    deltas = [
        GenerationDelta(0, t, None, 5, i + 1, retrieval=retrieval if i == 0 else None) for i, t in enumerate(pieces)
    ]
    deltas[-1] = dataclasses.replace(deltas[-1], finish_reason="stop")
    return deltas


async def read_through(
    reader: Callable[[AsyncIterator[GenerationDelta]], AsyncIterator[GenerationDelta]], deltas: list[GenerationDelta]
) -> list[GenerationDelta]:
    """What ``reader`` makes of ``deltas`` streamed to it."""

    async def source() -> AsyncIterator[GenerationDelta]:
        for delta in deltas:
            yield delta

    return [d async for d in reader(source())]
