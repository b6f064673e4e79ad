"""``POST /v1/embeddings`` over the real app and the real ``Retriever.embed``: shapes and refusals with a small
fake encoder. The vectors against what Milvus stores, with the real MiniLM, are checked end to end
(tests/e2e/test_completions_embeddings_e2e.py)."""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Sequence

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from mmrag.serving.config import MmragConfig
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from mmrag.serving.retrieval.encoders import Encoder
from mmrag.serving.retrieval.retriever import Retriever
from tests.fake_engine import FakeEngine

os.environ.setdefault("HF_HUB_OFFLINE", "1")

KEY = "sk-embeddings-test"


class WordEncoder(Encoder):
    """Words -> a 4-d vector of counts (letters, vowels, words, 1); reads at most 6 tokens with 2 specials."""

    name = "test/word-encoder"
    dim = 4
    max_tokens = 6
    special_tokens = 2

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, texts: Sequence[str], *, is_query: bool = False) -> np.ndarray:
        self.calls.append(list(texts))
        rows = []
        for text in texts:
            words = text.split()[: self.max_tokens - self.special_tokens]
            letters = sum(len(w) for w in words)
            vowels = sum(c in "aeiou" for w in words for c in w)
            rows.append([letters, vowels, len(words), 1.0])
        return np.asarray(rows, dtype=np.float32) / 8

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in re.finditer(r"\S+", text)]


def config(**limits) -> MmragConfig:
    return MmragConfig.model_validate(
        {
            "retrieval": {"default_mode": "none", "encoder": {"batch_size": 2}},
            "limits": {
                "max_embedding_inputs": 5,
                "max_embedding_input_chars": 40,
                "max_request_bytes": 100_000,
                **limits,
            },
            "server": {"api_keys": [KEY]},
        }
    )


def keyed_app(encoder: WordEncoder, cfg: MmragConfig | None = None) -> TestClient:
    cfg = cfg or config()
    client = TestClient(create_app(cfg, LocalBackend(FakeEngine(cfg), Retriever(cfg.retrieval, encoder=encoder))))
    client.headers["Authorization"] = f"Bearer {KEY}"
    return client


@pytest.fixture(scope="module")
def app_and_encoder():
    """One app for the module (building one is most of a test's time); each test starts with no encoding."""
    encoder = WordEncoder()
    with keyed_app(encoder) as client:
        yield client, encoder


@pytest.fixture
def encoder(app_and_encoder) -> WordEncoder:
    encoder = app_and_encoder[1]
    encoder.calls.clear()
    return encoder


@pytest.fixture
def http(app_and_encoder, encoder):
    return app_and_encoder[0]


@pytest.fixture
def client(http):
    return openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)


def test_float_and_base64_are_the_encoder_vectors(client, http, encoder):
    texts = ["one two", "a bee sea", "x", "five words in this text"]
    expected = encoder.encode(texts)
    floats = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2, 3]
    assert np.array_equal(np.asarray([d.embedding for d in floats.data], dtype=np.float32), expected)
    assert floats.model == "test/word-encoder"
    # Tokens read: words + 2 specials, at most 6 (the last input is cut to what the encoder reads).
    assert (floats.usage.prompt_tokens, floats.usage.total_tokens) == (4 + 5 + 3 + 6, 18)
    raw = http.post("/v1/embeddings", json={"model": "test/word-encoder", "input": texts, "encoding_format": "base64"})
    assert raw.status_code == 200
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw.json()["data"]]
    assert np.array_equal(np.stack(decoded), expected)
    # The SDK's default: it asks for base64 and decodes it itself.
    default = client.embeddings.create(model="minilm", input="one two")
    assert np.array_equal(np.asarray(default.data[0].embedding, dtype=np.float32), expected[0])
    # Encoded one encoder batch (batch_size 2) at a time, so chat retrievals interleave.
    assert ["one two", "a bee sea"] in encoder.calls and ["x", "five words in this text"] in encoder.calls


def test_a_string_input_and_user_and_own_dimensions(client):
    response = client.embeddings.create(model="minilm", input="hello there", dimensions=4, user="u-1")
    assert len(response.data) == 1 and len(response.data[0].embedding) == 4


@pytest.mark.parametrize(
    ("body", "status", "param", "says"),
    [
        ({"input": [1, 2, 3]}, 400, "input", "token arrays"),
        ({"input": [[1, 2], [3]]}, 400, "input", "token arrays"),
        ({"input": []}, 400, "input", "at least one"),
        ({"input": ["ok", ""]}, 400, "input", "input[1] is empty"),
        ({"input": ["x"] * 6}, 400, "input", "at most 5"),
        ({"input": ["ok", "y" * 41]}, 400, "input", "at most 40"),
        ({"input": {"text": "x"}}, 400, "input", ""),
        ({"encoding_format": "int8"}, 400, "encoding_format", ""),
        ({"dimensions": 2}, 400, "dimensions", "cannot shorten"),
        ({"dimensions": 0}, 400, "dimensions", ""),
        ({"model": "text-embedding-3-small"}, 404, "model", "does not exist"),
        ({"model": "smol"}, 404, "model", ""),
        ({"input": "\ud800"}, 400, "input", "surrogate"),
    ],
)
def test_refusals_name_the_field(http, encoder, body, status, param, says):
    payload = json.dumps({"model": "minilm", "input": "ok", **body})  # ASCII: a lone surrogate as its escape
    response = http.post("/v1/embeddings", content=payload, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"]
    assert encoder.calls == []  # refused before any encoding


def test_keys_body_rules_and_metrics_are_chats():
    with keyed_app(WordEncoder()) as http:  # its own: fresh counters
        _keys_body_rules_and_metrics(http)


def _keys_body_rules_and_metrics(http):
    assert (
        http.post("/v1/embeddings", json={"model": "minilm", "input": "x"}, headers={"Authorization": ""}).status_code
        == 401
    )
    form = http.post("/v1/embeddings", content=b"input=x", headers={"Content-Type": "text/plain"})
    assert form.status_code == 400 and form.json()["error"]["param"] == "Content-Type"
    assert http.post("/v1/embeddings", json={"model": "minilm", "input": "a b"}).status_code == 200
    text = http.get("/metrics").text
    assert "mmrag_embedding_inputs_total 1.0" in text and "mmrag_embedding_tokens_total 4.0" in text
    assert re.search(r'mmrag_requests_total\{status="400"\} 1\.0', text)


def test_large_body_over_the_limit_is_413(http, encoder):
    response = http.post("/v1/embeddings", json={"model": "minilm", "input": ["x " * 100] * 600})  # 120 KB
    assert response.status_code == 413 and encoder.calls == []


def test_no_retriever_is_a_404():
    cfg = config()
    with TestClient(create_app(cfg, LocalBackend(FakeEngine(cfg)))) as http:
        response = http.post(
            "/v1/embeddings", json={"model": "minilm", "input": "x"}, headers={"Authorization": f"Bearer {KEY}"}
        )
    assert response.status_code == 404 and response.json()["error"]["code"] == "embeddings_unavailable"
