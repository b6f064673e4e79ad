"""Keep each Serve replica's inter-deployment gRPC server on loopback when the whole Ray is.

Ray 2.60 binds that server to ``[::]:0`` unconditionally (``ray/serve/_private/replica.py``,
``_on_initialized``), so a ``mmrag serve`` on 127.0.0.1 still had one open port per replica on every
interface, reachable from the network with no authentication. ``mmrag serve`` sets
:data:`REPLICA_GRPC_HOST_ENV` only when it starts a local Ray whose node IP is 127.0.0.1 (see
:func:`mmrag.serving.cli.serve.local_ray_environment`); replicas inherit the environment, and each
deployment's constructor calls it first (:func:`mmrag.deployments.replica.start_replica`), since Serve
starts that server right after the constructor returns. (Not at this package's import: Serve unpickles a
deployment class by value, so a replica need not import ``mmrag.deployments`` at all; the LLM replica did
not.) Nothing changes when the variable is unset (a cluster, a public host).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

REPLICA_GRPC_HOST_ENV = "MMRAG_REPLICA_GRPC_HOST"
ANY_INTERFACE_EPHEMERAL = "[::]:0"


def keep_replica_grpc_on_loopback() -> None:
    host = os.environ.get(REPLICA_GRPC_HOST_ENV)
    if not host:
        return
    try:
        from ray.serve._private import replica
    except ImportError:  # not in a Ray process
        return
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None:  # a Ray version that binds differently: say so rather than fail the replica
        logger.warning("cannot keep the replica's gRPC server on %s: Ray's binding function moved", host)
        return
    if getattr(bind, "keeps_host", None) == host:
        return

    def bind_on_host(server, address: str):
        return bind(server, f"{host}:0" if address == ANY_INTERFACE_EPHEMERAL else address)

    bind_on_host.keeps_host = host  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = bind_on_host
