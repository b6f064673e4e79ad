"""A loopback `mmrag serve` opens no port beyond loopback (issue 31): every listening socket of the server's
whole process tree (Ray's GCS, raylet, workers, agents, Serve's proxy and each replica's gRPC server, vLLM)
is on a loopback address. Read with psutil from the running tiny-model server the e2e session shares."""

from __future__ import annotations

import ipaddress

import psutil
import pytest

pytestmark = pytest.mark.e2e


def listening_sockets(pid: int) -> list[tuple[str, str, int]]:
    root = psutil.Process(pid)
    found = []
    for process in [root, *root.children(recursive=True)]:
        try:
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((process.name(), conn.laddr.ip, conn.laddr.port))
        except psutil.NoSuchProcess:  # a worker that exited while we looked
            continue
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # '::ffff:127.0.0.1': Python 3.11 calls it not loopback
    return (mapped or address).is_loopback


def test_every_listener_of_a_loopback_server_is_on_loopback(tiny_server):
    listening = listening_sockets(tiny_server.pid)
    port = int(tiny_server.url.rsplit(":", 1)[1])
    assert any(found_port == port for _, _, found_port in listening), listening  # the tree was really read
    assert len(listening) > 5, listening  # Ray's GCS, raylet, agents and the replicas' gRPC servers among them
    public = [entry for entry in listening if not is_loopback(entry[1])]
    assert public == [], public
