"""``mmrag serve``: start the Serve application in the foreground; Ctrl-C stops it cleanly."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from mmrag.serving.cli.common import add_config_arguments, load_config
from mmrag.serving.ray_start import local_start_environment

if TYPE_CHECKING:
    from mmrag.serving.retrieval.lite_server import LiteServer

HELP = "Start the OpenAI-compatible server (Ray Serve + vLLM) in the foreground."

logger = logging.getLogger("mmrag.serve")

# Serve's own logs stay at WARNING and per-call access lines off; mmrag's loggers have their own level.
SERVE_LOGGING = {"log_level": "WARNING", "enable_access_log": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--host", default=None, help="Bind address (server.host).")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (server.port).")


def config_from_args(args: argparse.Namespace):
    shortcuts = [f"server.{name}={value}" for name in ("host", "port") if (value := getattr(args, name)) is not None]
    return load_config(args, shortcuts)


def run(args: argparse.Namespace) -> int:
    from mmrag.serving.logs import configure_logging

    config = config_from_args(args)
    configure_logging(config.server)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    phases = StartupPhases()
    with phases.timed("lite_server"):
        lite = start_lite_server(config)  # before Serve: its replicas connect to it
    code = 0
    try:
        start_serving(config, phases)
        url = f"http://{config.server.host}:{config.server.port}"
        logger.info(
            "ready url=%s model=%s seconds=%.1f phases=%s", url, config.model.served_name, phases.total(), phases
        )
        while not stop.wait(SUPERVISE_EVERY_S):
            if lite is not None and not lite.ensure_running():
                logger.error(
                    "the Milvus Lite server on %s is down and did not restart (exit code %s, log %s): stopping, "
                    "since retrieval and vector stores cannot work without it",
                    lite.data_dir,
                    lite.returncode,
                    lite.log_file,
                )
                code = 1
                break
        logger.info("stopping")
        stop_serving()
    finally:
        if lite is not None:  # after Serve: its replicas use it while they drain
            lite.stop()
    return code


SUPERVISE_EVERY_S = 1.0


class StartupPhases:
    """Where a start's time goes, logged with ``ready``: ``lite_server`` (start or join the Milvus Lite server),
    ``ray`` (import and start or join Ray), ``proxy`` (Serve's controller and HTTP proxy), ``deploy`` (every
    replica constructed: the LLM replica logs its model preparation and engine start, the retriever replica
    its own start)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - began

    def total(self) -> float:
        return time.perf_counter() - self.started

    def __str__(self) -> str:
        return ",".join(f"{name}:{seconds:.1f}" for name, seconds in self.seconds.items())


def start_lite_server(config) -> LiteServer | None:
    """On a Milvus Lite path with ``retrieval.milvus_lite_server`` (the default): the local Milvus Lite server
    that the retriever replicas, ``mmrag ingest`` and batch jobs share while this server runs, recorded in
    ``retrieval.lite_server_uri`` for the replicas. One already running on the path (another ``mmrag serve``'s)
    is joined instead, and stops with the process that started it."""
    from mmrag.serving.retrieval.lite_server import LiteServer, LiteServerError, find_running

    retrieval = config.retrieval
    if not retrieval.is_lite() or not retrieval.milvus_lite_server or retrieval.lite_server_uri is not None:
        return None
    path = retrieval.lite_path().resolve()
    running = find_running(path)
    if running is not None:
        logger.warning(
            "joining the Milvus Lite server already running on %s at %s (pid %d, started by pid %d): it stops "
            "with that process",
            path,
            running.uri,
            running.pid,
            running.owner_pid,
        )
        retrieval.lite_server_uri = running.uri
        return None
    server = LiteServer(path)
    try:
        server.start()
    except LiteServerError as exc:
        raise SystemExit(f"mmrag serve: {exc}") from exc
    retrieval.lite_server_uri = server.uri
    return server


def start_serving(config, phases: StartupPhases) -> None:
    """Start (or join) Ray, then deploy the app and wait until every replica is up."""
    environment = (
        local_ray_environment(config.server)
        | serve_transport_environment(config.server)
        | local_start_environment(config.server.ray_address)
    )
    if environment and "ray" in sys.modules:  # Ray reads it once, on import
        logger.warning("Ray was imported before its listeners could be kept on loopback")
    os.environ.update(environment)
    with phases.timed("ray"):
        import ray
        from ray import serve

        from mmrag.deployments.app import build_application

        ray.init(
            address=config.server.ray_address,
            num_cpus=config.server.ray_num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            configure_logging=True,
            ignore_reinit_error=True,
        )
    with phases.timed("proxy"):
        serve.start(http_options=http_options(config.server), logging_config=SERVE_LOGGING)
    with phases.timed("deploy"):
        serve.run(
            build_application(config),
            name="mmrag",
            route_prefix="/",
            logging_config={"log_level": config.server.log_level},
        )


def http_options(server) -> dict:
    """Serve's HTTP proxy (uvicorn). Ray exposes no header-read timeout and no connection bound for it:
    docs/usage.md ("Slow and hostile clients") says what a reverse proxy in front should add."""
    return {
        "host": server.host,
        "port": server.port,
        "request_timeout_s": server.request_timeout_s,
        "keep_alive_timeout_s": server.keep_alive_timeout_s,
    }


def local_ray_environment(server) -> dict[str, str]:
    """Environment that keeps a local Ray's listeners on loopback when the server itself is on loopback.

    A local Ray takes the machine's outward address as its node IP and binds its GCS, raylet, workers'
    gRPC, agents and metrics exporters to it or to every interface. With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
    (what Ray does by default on macOS and Windows) its node IP is 127.0.0.1 and they bind there; other
    nodes cannot join then, which a single-machine ``mmrag serve`` never needs. One listener stays on every
    interface in Ray itself: each Serve replica's inter-deployment gRPC server, which Ray binds to ``[::]:0``
    unconditionally (ray/serve/_private/replica.py); :mod:`mmrag.deployments.loopback` rebinds it to the node IP
    in each replica. Not applied when joining a cluster or serving on a non-loopback address, nor over a value
    the user set."""
    from mmrag.deployments.loopback import REPLICA_GRPC_HOST_ENV
    from mmrag.serving.openai.edge import is_loopback

    if server.ray_address is not None or not is_loopback(server.host):
        return {}
    local_cluster = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if local_cluster != "0":  # the user asked for a node IP other nodes can reach
        return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": local_cluster}
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", REPLICA_GRPC_HOST_ENV: "127.0.0.1"}


# Serve's HTTP proxy calls the ingress replica over gRPC (its default is a Ray actor call). `mmrag bench
# serving --systems mmrag,mmrag-proxy-grpc,vllm-serve` (tiny-random, 3 rounds, docs/results.md): tokens/s 1.3x
# at 1 stream and 1.6x at 4, TTFT 0.81x and 0.62x, server CPU per token 0.76x and 0.64x of the actor path.
SERVE_TRANSPORT = {"RAY_SERVE_PROXY_USE_GRPC": "1"}


def serve_transport_environment(server) -> dict[str, str]:
    """How the Serve proxy a local Ray starts reaches the ingress: :data:`SERVE_TRANSPORT`, except what the user
    set. A cluster joined by ``server.ray_address`` keeps its own (its proxies started with its environment;
    k8s/base sets the same in ConfigMap ``mmrag-env``)."""
    if server.ray_address is not None:
        return {}
    return {name: value for name, value in SERVE_TRANSPORT.items() if name not in os.environ}


def stop_serving() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
