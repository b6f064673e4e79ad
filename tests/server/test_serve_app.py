"""The real Serve application (ingress + LLM deployments, handles, backpressure) over the fake engine."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from mmrag.serving.config import MmragConfig

REPO = Path(__file__).resolve().parents[2]
MODEL = "smol"  # the default config's served name (these tests run fake engines)


@pytest.fixture(scope="module")
def app_url():
    ray = pytest.importorskip("ray")
    from ray import serve

    from mmrag.deployments.app import build_application

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # A replacement replica must take longer to start than the ingress's health call waits (5 s): with a
    # 3 s start, /health waited for the new replica and never showed the outage (failed in CI).
    env = {"PYTHONPATH": str(REPO), "MMRAG_FAKE_ENGINE_START_S": "10"}
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env})
    config = MmragConfig.model_validate(
        {
            "deployments": {"llm": {"max_ongoing_requests": 1, "max_queued_requests": 1}},
            "retrieval": {"default_mode": "none"},
        }
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(config, engine_cls="tests.fake_engine:FakeEngine"), name="test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def chat(url: str, text: str, **extra) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def test_chat_through_serve_handles(app_url):
    response = chat(app_url, "alpha beta")
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "alpha beta "
    assert httpx.get(f"{app_url}/health").status_code == 200


def test_replica_errors_keep_their_status_and_field(app_url):
    response = chat(app_url, "word " * 3000)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"


def test_overload_is_503_with_retry_after(app_url):
    """LLM stage: 1 request running + 1 queued; the next one is refused at once, not left waiting."""
    running = threading.Event()
    stop = threading.Event()

    def hold_stream():
        body = {"model": MODEL, "messages": [{"role": "user", "content": "slow"}], "stream": True}
        try:
            with httpx.stream("POST", f"{app_url}/v1/chat/completions", json=body, timeout=60) as response:
                running.set()  # headers arrive once the engine produced its first delta
                for _ in response.iter_lines():
                    if stop.is_set():
                        break
        except httpx.HTTPError:
            pass  # the queued stream is cut when the test ends

    holders = [threading.Thread(target=hold_stream, daemon=True) for _ in range(2)]
    holders[0].start()
    assert running.wait(timeout=30)
    holders[1].start()
    time.sleep(5.0)  # let the second request reach the LLM stage's queue (generous: shared CPUs)
    try:
        response = chat(app_url, "one more")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "server_overloaded"
    finally:
        stop.set()
        for thread in holders:
            thread.join(timeout=60)
    # Capacity comes back once the streams are gone.
    deadline = time.monotonic() + 30
    while (status := chat(app_url, "after").status_code) != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert status == 200


def test_dead_replica_is_a_503_and_serve_restarts_it(app_url):
    """Runs last: the LLM replica's process dies under a request. The request ends with a 503 (not a
    500, not a hang), /health reports the outage while Serve starts a replacement, then serving resumes."""
    response = chat(app_url, "die")
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "service_unavailable"
    statuses = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        statuses.append(httpx.get(f"{app_url}/health", timeout=30).status_code)
        if statuses[-1] == 200 and 503 in statuses:
            break
        time.sleep(0.2)
    assert 503 in statuses and statuses[-1] == 200, statuses
    assert chat(app_url, "alive again").json()["choices"][0]["message"]["content"] == "alive again "
