"""The playground's files as the app serves them (issue 34): the page and its two files, the
Content-Security-Policy on each, ``/`` sending browsers to the page, ``server.playground: false`` removing
all of it, and API keys: the files are public, every API call the page makes still needs the key. Over the
FastAPI app with the fake engine; the page itself is driven in a browser by test_playground_browser.py."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mmrag.serving.config import MmragConfig
from mmrag.serving.openai.playground_api import ASSETS, CONTENT_SECURITY_POLICY
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from tests.fake_engine import FakeEngine

PAGE_FILES = Path(__file__).parents[2] / "serving" / "openai" / "playground"
KEY = "sk-playground-test"


def client(**server) -> TestClient:
    config = MmragConfig.model_validate({"server": server, "retrieval": {"default_mode": "none"}})
    return TestClient(create_app(config, LocalBackend(FakeEngine(config))), base_url="http://127.0.0.1:8000")


@pytest.fixture(scope="module")
def http():
    with client() as http:
        yield http


def test_the_page_and_its_files_are_served_with_their_types(http):
    page = http.get("/playground")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.content == (PAGE_FILES / "index.html").read_bytes()
    for name, content_type in ASSETS.items():
        response = http.get(f"/playground/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"] == content_type
        assert response.content == (PAGE_FILES / name).read_bytes()


def test_every_page_response_carries_a_strict_content_security_policy(http):
    for path in ["/playground", *(f"/playground/{name}" for name in ASSETS)]:
        headers = http.get(path).headers
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
    directives = dict(d.split(" ", 1) for d in CONTENT_SECURITY_POLICY.split("; "))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval', no other host
    assert directives["connect-src"] == "'self'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY


def test_the_page_has_no_inline_script_or_style_and_loads_nothing_from_elsewhere():
    """The policy forbids inline script; the page must not need it (it would silently break)."""
    html = (PAGE_FILES / "index.html").read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, flags=re.S)
    assert scripts and all('src="playground/' in attrs and not body.strip() for attrs, body in scripts)
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"\son[a-z]+\s*=", html), "inline event handlers are inline script"
    links = re.findall(r"\b(?:src|href)=\"([^\"]*)\"", html)
    assert sorted(links) == ["data:,", "playground/playground.css", "playground/playground.js"]


def test_the_script_never_parses_strings_as_html():
    script = (PAGE_FILES / "playground.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink


def test_root_sends_a_browser_to_the_page(http):
    response = http.get("/", follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == "playground"
    assert http.get("/").url.path == "/playground"


def test_the_playground_off_by_configuration_is_not_there():
    with client(playground=False) as http:
        for path in ["/", "/playground", *(f"/playground/{name}" for name in ASSETS)]:
            response = http.get(path)
            assert response.status_code == 404, path
            assert response.json()["error"]["type"] == "invalid_request_error"
        assert http.get("/v1/models").status_code == 200  # the API itself is unchanged


def test_with_keys_the_files_are_public_and_every_api_call_needs_the_key():
    with client(api_keys=[KEY]) as http:
        for path in ["/", "/playground", *(f"/playground/{name}" for name in ASSETS)]:
            assert http.get(path, follow_redirects=False).status_code in (200, 307), path
        # What the page calls first: refused without the key, answered with it as a bearer header.
        refused = http.get("/v1/models")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        # Paths under /playground that are not files are not a way around the key for anything else.
        assert http.get("/playground/../v1/models").status_code in (401, 404)
        assert http.get("/playground/nothing-here").status_code == 404


def test_with_the_playground_off_its_paths_stay_behind_the_key():
    with client(api_keys=[KEY], playground=False) as http:
        assert http.get("/playground").status_code == 401


def test_a_cross_site_page_still_cannot_call_a_keyless_loopback_server(http):
    """Serving a page does not loosen the Origin check: only the server's own (loopback) origin passes."""
    chat = {"model": http.get("/v1/models").json()["data"][0]["id"], "messages": [{"role": "user", "content": "hi"}]}
    foreign = http.post("/v1/chat/completions", json=chat, headers={"Origin": "https://attacker.example"})
    assert foreign.status_code == 403 and foreign.json()["error"]["param"] == "Origin"
    own = http.post("/v1/chat/completions", json=chat, headers={"Origin": "http://127.0.0.1:8000"})
    assert own.status_code == 200, own.text


def test_the_page_files_are_package_data():
    """An installed (non-editable) mmrag must carry the files the router reads at start."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["mmrag.serving.openai"]
    served = ["index.html", *ASSETS]
    for name in served:
        assert any(fnmatch.fnmatch(f"playground/{name}", p) for p in patterns), name
    assert sorted(p.name for p in PAGE_FILES.iterdir()) == sorted(served)  # nothing shipped unserved
