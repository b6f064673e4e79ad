"""The OpenAI surface over a fake engine, driven by the real `openai` client (in-process transport)."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mmrag.serving.config import MmragConfig
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from tests.fake_engine import FakeEngine

MODEL = "smol"  # the default config's served name (these tests run fake engines)
# No retriever behind these apps: requests retrieve only when they ask (the default server always does).
NO_DEFAULT_RETRIEVAL = {"retrieval": {"default_mode": "none"}}


def png_url(size=(8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def engine():
    return FakeEngine(
        MmragConfig.model_validate({"limits": {"max_images_per_request": 2, "max_n": 3}, **NO_DEFAULT_RETRIEVAL})
    )


@pytest.fixture
def http(engine):
    with TestClient(create_app(engine.config, LocalBackend(engine))) as client:
        yield client


@pytest.fixture
def client(http):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


def image_message(text="one two three", images=1):
    parts = [{"type": "image_url", "image_url": {"url": png_url()}} for _ in range(images)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def test_chat_with_image(client, engine):
    response = client.chat.completions.create(model=MODEL, messages=image_message(), max_tokens=10)
    assert response.choices[0].message.content == "one two three "
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens == 3
    assert response.usage.total_tokens == response.usage.prompt_tokens + 3
    (request,) = engine.seen
    assert len(request.images) == 1 and request.images[0].size == (8, 8)
    assert request.messages[0]["content"][0] == {"type": "image"}


def test_n_and_max_completion_tokens(client):
    response = client.chat.completions.create(
        model=MODEL, messages=image_message("a b c d"), n=2, temperature=0.5, max_completion_tokens=2
    )
    assert [c.message.content for c in response.choices] == ["a b ", "a b "]
    assert {c.finish_reason for c in response.choices} == {"length"}
    assert response.usage.completion_tokens == 4


def test_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=image_message(), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three "
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_logprobs(client):
    response = client.chat.completions.create(
        model=MODEL, messages=image_message("one two"), logprobs=True, top_logprobs=3
    )
    (first, second) = response.choices[0].logprobs.content
    assert (first.token, first.logprob, first.bytes) == ("one ", 0.0, list(b"one "))
    assert [t.token for t in second.top_logprobs] == ["two ", "alt1 ", "alt2 "]
    assert second.top_logprobs[1].logprob == pytest.approx(-1.1)
    plain = client.chat.completions.create(model=MODEL, messages=image_message("one two"))
    assert plain.choices[0].logprobs is None
    stream = client.chat.completions.create(model=MODEL, messages=image_message("one two"), logprobs=True, stream=True)
    streamed = [t.token for c in stream for ch in c.choices if ch.logprobs for t in ch.logprobs.content]
    assert streamed == ["one ", "two "]


def test_stream_ends_with_done(http):
    body = {"model": MODEL, "messages": image_message(), "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"model": "other"}, 404, "model"),
        ({"messages": []}, 400, "messages"),
        ({"messages": image_message(images=3)}, 400, "messages"),
        ({"n": 4, "temperature": 1}, 400, "n"),
        ({"n": 2, "temperature": 0}, 400, "n"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x;base64,@@"}}]}
                ]
            },
            400,
            "messages[0].content[0].image_url.url",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            400,
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content"),
        ({"max_tokens": "many"}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "word " * 3000}]}, 400, "messages"),
    ],
)
def test_errors_are_openai_shaped(client, kwargs, status, param):
    body = {"model": MODEL, "messages": image_message(), **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**body)
    assert info.value.status_code == status
    error = info.value.body
    assert error["param"] == param
    assert error["message"] and error["type"]


@pytest.mark.parametrize("stream", [True, False])
def test_engine_errors_before_output_are_clean_4xx(client, stream):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * 3000}], stream=stream
        )
    assert info.value.body["param"] == "messages"


def test_malformed_and_oversized_bodies(http, engine):
    response = http.post("/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    engine.config.limits.max_request_bytes = 100
    response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": image_message()})
    assert response.status_code == 413


def test_models_health_metrics(client, http):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert http.get("/health").status_code == 200
    client.chat.completions.create(model=MODEL, messages=image_message())
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=image_message())
    text = http.get("/metrics").text
    assert 'mmrag_requests_total{status="200"} 1.0' in text
    assert 'mmrag_requests_total{status="404"} 1.0' in text
    assert "mmrag_completion_tokens_total 3.0" in text
    assert "mmrag_time_to_first_token_seconds_count 1.0" in text
    assert "fake_engine_running 0" in text


def test_health_is_503_when_engine_fails(http, engine):
    async def broken():
        raise RuntimeError("engine core died")

    engine.check_health = broken
    response = http.get("/health")
    assert response.status_code == 503 and response.headers["retry-after"]
    assert "engine core died" not in response.json()["error"]["message"]  # internals stay in the log


def test_api_keys(tmp_path, engine, monkeypatch):
    monkeypatch.setenv("MMRAG_API_KEYS", "from-env-1, from-env-2")
    key_file = tmp_path / "keys"
    key_file.write_text("from-file\n")
    config = MmragConfig.model_validate(
        {"server": {"api_keys": ["k1"], "api_key_file": str(key_file)}, **NO_DEFAULT_RETRIEVAL}
    )
    with TestClient(create_app(config, LocalBackend(engine))) as http:
        for key in ("k1", "from-file", "from-env-2"):
            client = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)
            assert client.models.list().data[0].id == MODEL
        bad = openai.OpenAI(base_url="http://testserver/v1", api_key="k2", http_client=http, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            bad.chat.completions.create(model=MODEL, messages=image_message())
        assert info.value.body["code"] == "invalid_api_key"
        assert http.get("/health").status_code == 200  # probes need no key
    assert "k1" not in repr(config) and "k1" not in str(config.model_dump_json())


def test_unknown_routes_and_methods_are_openai_shaped(http):
    assert http.get("/v1/nothing").json()["error"]["message"] == "Not Found"
    response = http.get("/v1/chat/completions")
    assert response.status_code == 405 and response.json()["error"]["type"] == "invalid_request_error"
