"""How `mmrag serve` starts Ray and Serve's HTTP proxy (issue 31): a local Ray next to a loopback server keeps
its listeners on loopback; the proxy gets the configured keep-alive. The real start is checked by hand with
`ss -ltnp` (docs/usage.md, "Slow and hostile clients"); these tests pin the settings it is given."""

from __future__ import annotations

import pytest

from mmrag.serving.cli.serve import SERVE_TRANSPORT, http_options, local_ray_environment, serve_transport_environment
from mmrag.serving.config import ServerConfig

LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "MMRAG_REPLICA_GRPC_HOST": "127.0.0.1"}


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


def test_a_local_rays_proxy_reaches_the_ingress_over_grpc_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_PROXY_USE_GRPC", raising=False)
    assert serve_transport_environment(ServerConfig()) == {"RAY_SERVE_PROXY_USE_GRPC": "1"} == SERVE_TRANSPORT
    assert serve_transport_environment(ServerConfig(host="0.0.0.0")) == SERVE_TRANSPORT  # not about listeners
    assert serve_transport_environment(ServerConfig(ray_address="ray://head:10001")) == {}
    monkeypatch.setenv("RAY_SERVE_PROXY_USE_GRPC", "0")
    assert serve_transport_environment(ServerConfig()) == {}


def test_the_proxy_gets_the_configured_timeouts():
    server = ServerConfig(port=9000, request_timeout_s=30, keep_alive_timeout_s=7)
    options = http_options(server)
    assert options == {"host": "127.0.0.1", "port": 9000, "request_timeout_s": 30, "keep_alive_timeout_s": 7}
    from ray.serve.config import HTTPOptions

    assert HTTPOptions(**options).keep_alive_timeout_s == 7  # a field Serve's proxy hands to uvicorn
    assert ServerConfig().keep_alive_timeout_s == 5  # Ray's own default is 90 s


def test_a_replica_binds_its_grpc_server_on_the_host_it_is_given(monkeypatch):
    from ray.serve._private import replica

    from mmrag.deployments.loopback import REPLICA_GRPC_HOST_ENV, keep_replica_grpc_on_loopback

    class Server:
        def __init__(self):
            self.addresses = []

        def add_insecure_port(self, address):
            self.addresses.append(address)
            return 4321

    monkeypatch.setattr(replica, "add_port_to_grpc_server", replica.add_port_to_grpc_server)  # restored after
    monkeypatch.delenv("RAY_USE_TLS", raising=False)
    monkeypatch.delenv(REPLICA_GRPC_HOST_ENV, raising=False)
    keep_replica_grpc_on_loopback()  # unset: Ray's binding stays
    server = Server()
    replica.add_port_to_grpc_server(server, "[::]:0")
    assert server.addresses == ["[::]:0"]

    monkeypatch.setenv(REPLICA_GRPC_HOST_ENV, "127.0.0.1")
    keep_replica_grpc_on_loopback()
    keep_replica_grpc_on_loopback()  # idempotent: one wrapper, not two
    assert replica.add_port_to_grpc_server(server, "[::]:0") == 4321
    replica.add_port_to_grpc_server(server, "0.0.0.0:9000")  # an explicit address is left alone
    assert server.addresses == ["[::]:0", "127.0.0.1:0", "0.0.0.0:9000"]


def test_startup_phases_are_timed_in_order_even_when_one_fails():
    from mmrag.serving.cli.serve import StartupPhases

    phases = StartupPhases()
    with phases.timed("ray"):
        pass
    with pytest.raises(RuntimeError), phases.timed("deploy"):
        raise RuntimeError("a replica failed")
    assert list(phases.seconds) == ["ray", "deploy"]
    assert all(seconds >= 0 for seconds in phases.seconds.values())
    assert str(phases).startswith("ray:") and ",deploy:" in str(phases)
    assert phases.total() >= sum(phases.seconds.values())


def test_a_local_ray_start_waits_longer_for_its_gcs_unless_the_user_set_the_wait(monkeypatch):
    from mmrag.serving.ray_start import GCS_PORT_WAIT_ENV, GCS_PORT_WAIT_S, local_start_environment

    monkeypatch.delenv(GCS_PORT_WAIT_ENV, raising=False)
    assert local_start_environment(None) == {GCS_PORT_WAIT_ENV: str(GCS_PORT_WAIT_S)}
    assert local_start_environment("ray://head:10001") == {}  # joining: the cluster's GCS is already up
    monkeypatch.setenv(GCS_PORT_WAIT_ENV, "45")
    assert local_start_environment(None) == {}
