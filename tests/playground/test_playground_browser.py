"""The playground in a real browser against the app with the fake engine, on a server with API keys: the
page loads under its Content-Security-Policy with no error, asks for the key, sends it as a bearer header
once typed, streams an answer and shows model text as text. (The page against the real model, with an
image, retrieval and the token figures: tests/e2e/test_playground_e2e.py.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from mmrag.serving.config import MmragConfig
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from mmrag.serving.server_process import free_port
from tests.fake_engine import FakeEngine
from tests.playground.browser import chromium_page, needs_chromium

pytestmark = [needs_chromium, pytest.mark.slow]  # a browser start: a few seconds

KEY = "sk-playground-browser"


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[str]:
    """The app on a loopback port in this process (uvicorn in a thread): no Ray, no vLLM."""
    port = free_port()
    config = MmragConfig.model_validate(
        {"server": {"port": port, "api_keys": [KEY]}, "retrieval": {"default_mode": "none"}}
    )
    app = create_app(config, LocalBackend(FakeEngine(config)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_the_page_sends_the_typed_key_and_streams_an_answer_as_text(keyed_server, tmp_path):
    with chromium_page(tmp_path / "profile") as (page, problems):
        sent_keys: list[str | None] = []
        page.on("request", lambda r: "/v1/" in r.url and sent_keys.append(r.headers.get("authorization")))

        page.goto(f"{keyed_server}/")  # the redirect to /playground
        assert page.url == f"{keyed_server}/playground"
        page.wait_for_selector("#status.error")
        assert "API key" in page.text_content("#status")  # /v1/models answered 401 without a key

        page.fill("#api-key", KEY)
        page.press("#api-key", "Tab")  # a change event: the page retries with the key
        page.wait_for_selector("#model:has-text('smol')")
        page.select_option(".lane[data-lane=A] [name=mode]", "none")
        question = "<img src=x onerror=alert(1)> one two three"
        page.fill("#question", question)
        page.click("#send")
        answer = page.wait_for_selector(".answer[data-state=done], .answer[data-state=failed]", timeout=20_000)

        assert answer.get_attribute("data-state") == "done", answer.inner_text()
        # The fake engine echoes the question a word per delta: streamed in pieces, shown as text.
        assert answer.query_selector(".text").text_content().split() == question.split()
        assert int(answer.get_attribute("data-chunks")) == len(question.split())
        assert page.query_selector(".answer .text img") is None
        prompt_tokens = page.text_content(".answer [data-figure=prompt_tokens] dd")
        assert int(prompt_tokens) > 0
        assert page.text_content(".answer [data-figure=ttft] dd").endswith(" ms")
        assert problems.errors == []
        assert sent_keys[0] is None and sent_keys[-1] == f"Bearer {KEY}"
        assert all(key == f"Bearer {KEY}" for key in sent_keys[1:])
