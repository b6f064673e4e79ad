"""Request bodies at the ingress (issue 31): clients that hang up mid-upload, bodies sent too slowly, and the
in-flight gauge over a stream. The app is called through ASGI directly, so a test decides when each piece of
the body arrives, when the client hangs up, and what happens while a stream is being sent."""

from __future__ import annotations

import asyncio
import json
import logging

from mmrag.serving.config import MmragConfig
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from tests.fake_engine import FakeEngine

JSON = [("content-type", "application/json")]


def make_app(**limits):
    config = MmragConfig.model_validate({"limits": limits, "retrieval": {"default_mode": "none"}})
    return create_app(config, LocalBackend(FakeEngine(config)))


def chat_body(text: str = "hello", **extra) -> bytes:
    return json.dumps({"model": "smol", "messages": [{"role": "user", "content": text}], **extra}).encode()


async def call(app, receive, send=None, *, method="POST", path="/v1/chat/completions", headers=JSON) -> list[dict]:
    """One request through the ASGI app, on a loopback socket; returns the messages it sent."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), *((k.encode(), v.encode()) for k, v in headers)],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    sent: list[dict] = []

    async def record(message: dict) -> None:
        sent.append(message)
        if send is not None:
            await send(message)

    await app(scope, receive, record)
    return sent


def status_of(sent: list[dict]) -> int:
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def body_of(sent: list[dict]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


async def metrics_text(app) -> str:
    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    return body_of(await call(app, receive, method="GET", path="/metrics", headers=[])).decode()


def messages(*items: dict):
    """A receive() that hands out ``items`` in order, then waits forever (a client that sends no more)."""
    queue = list(items)

    async def receive() -> dict:
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()

    return receive


def piece(data: bytes, more: bool = True) -> dict:
    return {"type": "http.request", "body": data, "more_body": more}


def test_a_partial_upload_closed_by_the_client_is_counted_499_and_logged_once_at_info(caplog):
    app = make_app()

    async def scenario():
        sent = await call(app, messages(piece(chat_body()[:20]), {"type": "http.disconnect"}))
        return sent, await metrics_text(app)

    with caplog.at_level(logging.DEBUG):
        sent, metrics = asyncio.run(scenario())
    assert status_of(sent) == 499
    assert 'mmrag_requests_total{status="499"} 1.0' in metrics
    assert 'status="500"' not in metrics
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    closed = [r for r in caplog.records if "client closed" in r.getMessage()]
    assert len(closed) == 1 and closed[0].levelno == logging.INFO and closed[0].exc_info is None


def test_a_body_that_stops_arriving_is_a_408_after_the_idle_timeout():
    app = make_app(body_idle_timeout_s=0.05, body_read_timeout_s=30)
    sent = asyncio.run(call(app, messages(piece(chat_body()[:20]))))  # then nothing more, connection open
    assert status_of(sent) == 408
    error = json.loads(body_of(sent))["error"]
    assert error["type"] == "invalid_request_error" and "no request body data for 0.05 s" in error["message"]


def test_a_body_trickling_in_is_a_408_after_the_total_timeout():
    app = make_app(body_idle_timeout_s=5, body_read_timeout_s=0.2)

    async def trickle() -> dict:  # a byte every 10 ms: never idle for long, never done
        await asyncio.sleep(0.01)
        return piece(b" ")

    sent = asyncio.run(call(app, trickle))
    assert status_of(sent) == 408
    assert "request body not received within 0.2 s" in json.loads(body_of(sent))["error"]["message"]


def test_a_small_body_trickling_in_is_cut_by_the_minimum_rate_long_before_the_total_timeout():
    """A declared 2000-byte body, a byte per 10 ms, at a 20000 bytes/s minimum: it must arrive within the idle
    timeout + 2000 / 20000 = 0.2 s, not the 30 s total (without the rate, the 10 s guard below fails)."""
    app = make_app(body_idle_timeout_s=0.1, body_read_timeout_s=30, body_min_bytes_per_s=20000)

    async def trickle() -> dict:
        await asyncio.sleep(0.01)
        return piece(b" ")

    headers = [*JSON, ("content-length", "2000")]
    sent = asyncio.run(asyncio.wait_for(call(app, trickle, headers=headers), timeout=10))
    assert status_of(sent) == 408
    assert "request body not received within 0.2 s" in json.loads(body_of(sent))["error"]["message"]


def test_a_body_in_pieces_within_the_timeouts_is_served():
    app = make_app(body_idle_timeout_s=5, body_read_timeout_s=30)
    body = chat_body("one two")
    sent = asyncio.run(call(app, messages(piece(body[:10]), piece(body[10:30]), piece(body[30:], more=False))))
    assert status_of(sent) == 200, body_of(sent)
    assert json.loads(body_of(sent))["choices"][0]["message"]["content"] == "one two "


def in_flight(metrics: str) -> float:
    (line,) = [line for line in metrics.splitlines() if line.startswith("mmrag_requests_in_flight ")]
    return float(line.split()[1])


def test_a_stream_counts_in_flight_until_it_ends():
    """The fake engine streams "slow" forever; the gauge is read while chunks are being sent, then the client
    hangs up, and the gauge must be back to 0."""
    app = make_app()
    readings: list[float] = []
    hung_up = asyncio.Event()
    body = [piece(chat_body("slow", stream=True), more=False)]

    async def receive() -> dict:
        if body:
            return body.pop()
        await hung_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and message.get("body") and not readings:
            readings.append(in_flight(await metrics_text(app)))
            hung_up.set()

    async def scenario():
        sent = await call(app, receive, send)
        return sent, in_flight(await metrics_text(app))

    sent, after = asyncio.run(scenario())
    assert status_of(sent) == 200
    assert readings == [1.0]
    assert after == 0.0


def test_a_finished_stream_leaves_the_gauge_at_zero():
    app = make_app()

    async def scenario():
        sent = await call(app, messages(piece(chat_body("a b c", stream=True), more=False)))
        return sent, await metrics_text(app)

    sent, metrics = asyncio.run(scenario())
    assert body_of(sent).endswith(b"data: [DONE]\n\n")
    assert in_flight(metrics) == 0.0 and 'mmrag_requests_total{status="200"} 1.0' in metrics
