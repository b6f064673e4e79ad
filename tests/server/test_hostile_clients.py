"""Hostile and careless clients against the app over a fake engine (issue 31): every input here is small or
made cheap (bomb headers with no pixels behind them), so nothing endangers the machine running the tests."""

from __future__ import annotations

import asyncio
import base64
import io
import threading

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mmrag.serving import media as media_module
from mmrag.serving import pipeline as pipeline_module
from mmrag.serving.config import MmragConfig
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import INLINE_PARSE_BYTES, LocalBackend
from mmrag.serving.retrieval.errors import (
    RetrievalTimeoutError,
    RetrievalUnavailableError,
    StoreUnreachableError,
    UnknownCollectionError,
)
from tests.fake_engine import FakeEngine
from tests.unit.test_media import bomb_png

LIMITS = {"max_images_per_request": 4, "image_downscale_pixels": 2048, "max_request_image_pixels": 40_000_000}


def make_config(**limits) -> MmragConfig:
    return MmragConfig.model_validate({"limits": {**LIMITS, **limits}, "retrieval": {"default_mode": "none"}})


@pytest.fixture
def engine():
    return FakeEngine(make_config())


@pytest.fixture
def http(engine):
    with TestClient(create_app(engine.config, LocalBackend(engine))) as client:
        yield client


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def png_url(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, "PNG")
    return data_url(buf.getvalue())


def chat(engine: FakeEngine, *urls: str | None, text: str = "hello") -> dict:
    images = [{"type": "image_url", "image_url": {"url": url}} for url in urls if url is not None]
    parts = [{"type": "text", "text": text}, *images]
    return {"model": engine.config.model.served_name, "messages": [{"role": "user", "content": parts}]}


def assert_error(response, status: int, param: str | None, fragment: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"], error


def test_elongated_image_is_a_400_naming_the_part(http, engine):
    response = http.post("/v1/chat/completions", json=chat(engine, data_url(bomb_png(1, 100_000))))
    assert_error(response, 400, "messages[0].content[1].image_url.url", "aspect ratio")
    assert engine.seen == []


def test_request_pixel_budget_is_a_413_before_decoding(http, engine):
    urls = [data_url(bomb_png(4000, 4000)) for _ in range(3)]  # 48 Mpx declared, no pixel data behind them
    response = http.post("/v1/chat/completions", json=chat(engine, *urls))
    assert_error(response, 413, "messages[0].content[3].image_url.url", "pixels in all")


def test_the_engine_receives_downscaled_images(http, engine):
    response = http.post("/v1/chat/completions", json=chat(engine, png_url((128, 64)), png_url((16, 8))))
    assert response.status_code == 200, response.text
    (request,) = engine.seen
    assert [image.size for image in request.images] == [(64, 32), (16, 8)]  # 2048 pixels at most, aspect kept


def test_content_parts_are_capped(engine):
    config = make_config(max_content_parts=3)
    with TestClient(create_app(config, LocalBackend(FakeEngine(config)))) as http:
        body = chat(engine, text="hi")
        body["messages"][0]["content"] *= 4
        assert_error(http.post("/v1/chat/completions", json=body), 400, "messages", "at most 3 per request")
        body["messages"][0]["content"] = body["messages"][0]["content"][:3]
        assert http.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize("heavy", ["parse_chat_body", "decode_image"])
def test_a_big_request_does_not_stall_a_tiny_one(monkeypatch, engine, heavy):
    """The big request's heavy step waits (where it runs) until the tiny request has answered, 5 s at most.
    Off the event loop the tiny request answers at once; on it, the wait blocks the tiny one, times out,
    and the tiny request answers second."""
    module = pipeline_module if heavy == "parse_chat_body" else media_module
    original = getattr(module, heavy)
    started, tiny_answered, released = threading.Event(), threading.Event(), []

    def gated(*args, **kwargs):
        if heavy == "decode_image" or len(args[0]) > INLINE_PARSE_BYTES:  # the big body; every image
            started.set()
            released.append(tiny_answered.wait(timeout=5))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, heavy, gated)
    # Over the inline-parse size, within the prompt-length bound.
    big = chat(engine, png_url((64, 64)) if heavy == "decode_image" else None, text="x" * 30_000)
    app = create_app(engine.config, LocalBackend(engine))

    async def scenario() -> list[str]:
        order: list[str] = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:

            async def send(name: str, body: dict) -> None:
                response = await client.post("/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                order.append(name)

            big_request = asyncio.create_task(send("big", big))
            # Bounded: a big request that failed before its gate must fail the test, not hang it.
            for _ in range(2000):
                if started.is_set() or big_request.done():
                    break
                await asyncio.sleep(0.005)
            assert started.is_set(), big_request.result() if big_request.done() else "the big request never started"
            await send("tiny", chat(engine, text="hi"))
            tiny_answered.set()
            await big_request
        return order

    assert asyncio.run(scenario()) == ["tiny", "big"]
    assert released == [True]


NESTED_FIELDS = [
    '"metadata": NESTED',
    '"compression": {"kv": {"method": "none", "x": NESTED}}',
    '"retrieval": {"filter": NESTED}',
    '"stop": NESTED',
    '"messages": [{"role": "user", "content": NESTED}]',
]


@pytest.mark.parametrize("depth", [1000, 100_000])  # a 2 KB body parsed on the loop; a 200 KB one in a worker
@pytest.mark.parametrize("field", NESTED_FIELDS)
@pytest.mark.parametrize("kind", ["list", "object"])
def test_deeply_nested_json_is_a_400(http, engine, depth, field, kind):
    nested = "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth
    fields = field.replace("NESTED", nested)
    if not field.startswith('"messages"'):
        fields = '"messages": [{"role": "user", "content": "hi"}], ' + fields
    body = f'{{"model": "{engine.config.model.served_name}", {fields}}}'
    response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:99999/a.png", "http://[::1/a.png", "http://example.com/a\r\nX-Injected: 1"]
)
def test_malformed_image_urls_are_400s_naming_the_part(http, engine, url):
    response = http.post("/v1/chat/completions", json=chat(engine, url))
    assert_error(response, 400, "messages[0].content[1].image_url.url", "image URL")


def test_unimplemented_fields_are_a_400_not_a_silent_200(http, engine):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    # `auto` needs a tool-call parser for the served model, which it lacks (forced calls are served).
    response = http.post("/v1/chat/completions", json={**chat(engine), "tools": tools, "tool_choice": "auto"})
    assert_error(response, 400, "tool_choice", "tool-call parser")
    response = http.post("/v1/chat/completions", json={**chat(engine), "audio": {"voice": "alloy", "format": "mp3"}})
    assert_error(response, 400, "audio", "`audio` is not supported by this server")
    assert engine.seen == []


class FailingRetriever:
    """A retriever that raises what it is given (the errors a Milvus-backed one raises)."""

    def __init__(self, error: Exception):
        self.error = error

    async def retrieve(self, options, query_text):
        raise self.error


def retrieval_app(engine: FakeEngine, error: Exception) -> TestClient:
    return TestClient(create_app(engine.config, LocalBackend(engine, FailingRetriever(error))))


def with_retrieval(engine: FakeEngine, **options) -> dict:
    return {**chat(engine), "retrieval": {"mode": "text", **options}}


@pytest.mark.parametrize(
    ("error", "status", "param", "fragment"),
    [
        (UnknownCollectionError("collection 'nope' does not exist"), 404, "retrieval.collection", "'nope'"),
        (StoreUnreachableError("search: cannot open Milvus at /srv/mmrag/milvus.db: locked"), 503, "retrieval", ""),
        (RetrievalUnavailableError("search failed on Milvus at /srv/x.db: RecursionError"), 503, "retrieval", ""),
        (RetrievalTimeoutError("search on Milvus at http://10.0.0.7:19530 timed out"), 503, "retrieval", ""),
    ],
)
def test_retrieval_failures_have_the_right_status_and_no_server_details(engine, error, status, param, fragment):
    with retrieval_app(engine, error) as http:
        response = http.post("/v1/chat/completions", json=with_retrieval(engine))
    assert_error(response, status, param, fragment)
    message = response.json()["error"]["message"]
    assert "/srv" not in message and "10.0.0.7" not in message and "Recursion" not in message
    if status == 503:
        assert response.headers["retry-after"] == "1"


def test_every_503_carries_retry_after(engine):
    with TestClient(create_app(engine.config, LocalBackend(engine))) as http:  # no retriever configured
        response = http.post("/v1/chat/completions", json=with_retrieval(engine))
    assert response.status_code == 503 and response.headers["retry-after"] == "1"


def test_a_deeply_nested_filter_is_a_400_on_retrieval_filter(http, engine):
    response = http.post("/v1/chat/completions", json=with_retrieval(engine, filter="(" * 200 + "a" + ")" * 200))
    assert_error(response, 400, "retrieval.filter", "nested too deeply")


def test_lone_surrogates_are_a_400_naming_the_field(http, engine):
    body = f'{{"model": "{engine.config.model.served_name}", "messages": [{{"role": "user", "content": "a \\ud800"}}]}}'
    response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_error(response, 400, "messages[0].content", "not valid Unicode")
    paired = body.replace("\\ud800", "\\ud83d\\ude00")  # a surrogate pair is one character: fine
    assert http.post("/v1/chat/completions", content=paired, headers={"content-type": "application/json"}).is_success


def test_messages_echo_a_bounded_prefix_of_client_input(http, engine):
    response = http.post("/v1/chat/completions", json={**chat(engine), "model": "m" * 100_000})
    assert_error(response, 404, "model", "(100000 characters)")
    assert len(response.json()["error"]["message"]) < 300


class RecordingRetriever:
    """A retriever that finds nothing and records the queries it was asked."""

    def __init__(self):
        self.queries: list[str] = []

    async def retrieve(self, options, query_text):
        from mmrag.serving.retrieval.protocol import RetrievalInfo, RetrievalResult

        self.queries.append(query_text)
        return RetrievalResult(info=RetrievalInfo(mode="text"))


def test_a_prompt_too_long_to_fit_is_refused_before_retrieval(engine):
    retriever = RecordingRetriever()
    limit = 16 * engine.config.engine.max_model_len  # the default bound: 16 characters per context token
    with TestClient(create_app(engine.config, LocalBackend(engine, retriever))) as http:
        body = {**chat(engine, text="x" * (limit + 1)), "retrieval": {"mode": "text"}}
        assert_error(http.post("/v1/chat/completions", json=body), 400, "messages", "characters of message text")
    assert retriever.queries == [] and engine.seen == []


def test_the_retrieval_query_is_cut_to_max_query_chars(engine):
    retriever = RecordingRetriever()
    assert engine.config.retrieval.max_query_chars == 2000
    with TestClient(create_app(engine.config, LocalBackend(engine, retriever))) as http:
        body = {**chat(engine, text="q" * 3000), "retrieval": {"mode": "text"}}
        assert http.post("/v1/chat/completions", json=body).status_code == 200
    assert retriever.queries == ["q" * 2000]
