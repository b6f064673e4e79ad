"""Memory after large image requests (issue 31): freed decode buffers go back to the OS (glibc keeps them in
its arenas otherwise). The RSS effect is measured, not asserted (see ``release_freed_memory``); the tests check
that the release runs after a request that decoded many pixels, only then, and that it works here."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from mmrag.serving import media
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from tests.fake_engine import FakeEngine
from tests.server.test_hostile_clients import chat, make_config, png_url


@pytest.fixture
def releases(monkeypatch):
    calls: list[str] = []
    original = media.release_freed_memory

    def spy() -> None:
        calls.append("release")
        original()  # the real call, so a broken binding to malloc_trim fails here

    monkeypatch.setattr(media, "release_freed_memory", spy)
    monkeypatch.setattr(media, "TRIM_AFTER_PIXELS", 1000)  # tiny images stand in for large ones
    return calls


@pytest.mark.parametrize(
    ("sizes", "released"),
    [([(20, 20), (30, 30)], 1), ([(20, 20), (30, 20)], 0), ([], 0)],  # 1000 pixels: not over
)
def test_memory_is_released_after_requests_that_decode_many_pixels(releases, sizes, released):
    engine = FakeEngine(make_config())
    with TestClient(create_app(engine.config, LocalBackend(engine))) as http:
        response = http.post("/v1/chat/completions", json=chat(engine, *(png_url(size) for size in sizes)))
    assert response.status_code == 200, response.text
    assert releases == ["release"] * released


def test_malloc_trim_is_found_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    assert media._MALLOC_TRIM is not None
    media.release_freed_memory()
