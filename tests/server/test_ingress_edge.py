"""The HTTP edge (issue 31): JSON bodies only, Host and Origin on a keyless loopback server (DNS rebinding,
cross-site requests from a web page), API keys on the schema pages, Ray Serve's override headers. The test
client connects as if to 127.0.0.1:8000, so the app sees a loopback socket as it would under `mmrag serve`."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from mmrag.serving.config import MmragConfig
from mmrag.serving.openai.edge import host_name, is_loopback, is_loopback_origin
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from tests.fake_engine import FakeEngine

LOOPBACK_URL = "http://127.0.0.1:8000"
CHAT = {"model": "smol", "messages": [{"role": "user", "content": "one two"}]}


def client(base_url: str = LOOPBACK_URL, **server) -> TestClient:
    config = MmragConfig.model_validate({"server": server, "retrieval": {"default_mode": "none"}})
    return TestClient(create_app(config, LocalBackend(FakeEngine(config))), base_url=base_url)


def assert_error(response, status: int, param: str | None, fragment: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
    assert error["type"] and "code" in error


@pytest.fixture
def http():
    with client() as http:
        yield http


# Content-Type


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]
)
def test_a_chat_body_not_declared_json_is_a_400_naming_the_header(http, content_type):
    """A web page can POST text/plain or a form to any server without a CORS preflight, but not JSON."""
    headers = {"content-type": content_type} if content_type else {}
    response = http.post("/v1/chat/completions", content=json.dumps(CHAT).encode(), headers=headers)
    assert_error(response, 400, "Content-Type", "Content-Type must be application/json")
    assert response.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
def test_json_bodies_with_parameters_or_any_case_are_served(http, content_type):
    response = http.post("/v1/chat/completions", content=json.dumps(CHAT), headers={"content-type": content_type})
    assert response.status_code == 200, response.text


# Host (DNS rebinding)


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "10.0.0.5:8000", "localhost.evil:8000"])
def test_a_keyless_loopback_server_refuses_a_foreign_host_header(http, host):
    headers = {"host": host}
    for response in (
        http.post("/v1/chat/completions", json=CHAT, headers=headers),
        http.get("/v1/models", headers=headers),
        http.get("/metrics", headers=headers),
        http.get("/openapi.json", headers=headers),
    ):
        assert_error(response, 403, "Host", "is not accepted by this server")


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8000", "localhost", "localhost:8000", "LOCALHOST:1", "[::1]:8000", "127.1.2.3"]
)
def test_loopback_host_headers_are_served(http, host):
    assert http.post("/v1/chat/completions", json=CHAT, headers={"host": host}).status_code == 200


def test_allowed_hosts_adds_names_and_star_accepts_any():
    with client(allowed_hosts=["api.example.com"]) as http:
        assert http.get("/v1/models", headers={"host": "API.example.com:443"}).status_code == 200
        assert http.get("/v1/models", headers={"host": "localhost:8000"}).status_code == 200
        assert_error(http.get("/v1/models", headers={"host": "other.example"}), 403, "Host", "allowed_hosts")
    with client(allowed_hosts=["*"]) as http:
        assert http.get("/v1/models", headers={"host": "anything.example"}).status_code == 200


def test_the_host_check_is_off_with_api_keys_or_a_public_bind_unless_configured():
    key = {"authorization": "Bearer k1"}
    with client(api_keys=["k1"]) as http:
        assert http.get("/v1/models", headers={"host": "api.example.com", **key}).status_code == 200
    with client(host="0.0.0.0") as http:
        assert http.get("/v1/models", headers={"host": "api.example.com"}).status_code == 200
    with client(api_keys=["k1"], allowed_hosts=["api.example.com"]) as http:  # an explicit list always applies
        assert http.get("/v1/models", headers={"host": "api.example.com", **key}).status_code == 200
        assert_error(http.get("/v1/models", headers={"host": "evil.example", **key}), 403, "Host", "evil.example")


# Origin (cross-site requests)


@pytest.mark.parametrize("origin", ["https://attacker.example", "http://localhost.attacker.example", "null", "file://"])
def test_a_keyless_loopback_server_refuses_a_foreign_origin(http, origin):
    response = http.post("/v1/chat/completions", json=CHAT, headers={"origin": origin})
    assert_error(response, 403, "Origin", "not accepted by this server")
    assert response.json()["error"]["code"] == "origin_not_allowed"


@pytest.mark.parametrize("origin", ["http://localhost:3000", "http://127.0.0.1:8000", "https://[::1]"])
def test_loopback_origins_are_served(http, origin):
    assert http.post("/v1/chat/completions", json=CHAT, headers={"origin": origin}).status_code == 200


def test_allowed_origins_adds_origins():
    with client(allowed_origins=["https://app.example.com"]) as http:
        assert http.get("/v1/models", headers={"origin": "https://app.example.com/"}).status_code == 200
        assert_error(http.get("/v1/models", headers={"origin": "https://evil.example"}), 403, "Origin", "evil")
    with client(host="0.0.0.0") as http:  # no list, public bind: browsers' origins are the API keys' business
        assert http.get("/v1/models", headers={"origin": "https://evil.example"}).status_code == 200


# API keys


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/v1/models", "/nope"])
def test_with_api_keys_every_page_but_health_and_metrics_needs_one(path):
    with client(api_keys=["k1"]) as http:
        assert_error(http.get(path), 401, None, "invalid or missing API key")
        assert_error(http.get(path, headers={"authorization": "Bearer k2"}), 401, None, "API key")
        assert http.get(path, headers={"authorization": "Bearer k1"}).status_code in (200, 404)
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200


def test_schema_pages_stay_open_without_keys(http):
    assert http.get("/openapi.json").status_code == 200
    assert http.get("/docs").status_code == 200


# Ray Serve's per-request overrides


@pytest.mark.parametrize("header", [("x-request-timeout-seconds", "0"), ("x-request-disconnect-disabled", "?1")])
def test_ray_serve_override_headers_are_refused(http, header):
    response = http.post("/v1/chat/completions", json=CHAT, headers=dict([header]))
    assert_error(response, 400, header[0], "the server's own timeouts apply")


# The parsing under the checks


def test_host_names_and_origins_are_parsed_strictly():
    assert host_name("[::1]:8000") == "::1" and host_name("LocalHost:80") == "localhost"
    assert host_name("evil@localhost") is None and host_name("localhost/x") is None and host_name("") is None
    assert is_loopback("127.9.9.9") and is_loopback("[::1]") and not is_loopback("localhost.") and not is_loopback("::")
    assert (
        is_loopback_origin("http://[::1]:9")
        and not is_loopback_origin("http://[::1")
        and not is_loopback_origin("ws://localhost")
    )
