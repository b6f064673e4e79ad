"""How `mmrag serve` starts Ray and Serve's HTTP proxy (issue 31): a local Ray next to a loopback server keeps
its listeners on loopback; the proxy gets the configured keep-alive. The real start is checked by hand with
`ss -ltnp` (docs/usage.md, "Slow and hostile clients"); these tests pin the settings it is given."""

from __future__ import annotations

import pytest

from mmrag.serving.cli.serve import http_options, local_ray_environment
from mmrag.serving.config import ServerConfig

LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_a_local_ray_beside_a_loopback_server_stays_on_loopback(host, monkeypatch):
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    assert local_ray_environment(ServerConfig(host=host)) == LOOPBACK_RAY


def test_a_public_server_a_joined_cluster_or_the_users_choice_are_left_alone(monkeypatch):
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    assert local_ray_environment(ServerConfig(host="0.0.0.0")) == {}
    assert local_ray_environment(ServerConfig(ray_address="ray://head:10001")) == {}
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    assert local_ray_environment(ServerConfig()) == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}


def test_the_proxy_gets_the_configured_timeouts():
    server = ServerConfig(port=9000, request_timeout_s=30, keep_alive_timeout_s=7)
    options = http_options(server)
    assert options == {"host": "127.0.0.1", "port": 9000, "request_timeout_s": 30, "keep_alive_timeout_s": 7}
    from ray.serve.config import HTTPOptions

    assert HTTPOptions(**options).keep_alive_timeout_s == 7  # a field Serve's proxy hands to uvicorn
    assert ServerConfig().keep_alive_timeout_s == 5  # Ray's own default is 90 s
