"""``mmrag serve``: start the Serve application in the foreground; Ctrl-C stops it cleanly."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

from mmrag.serving.cli.common import add_config_arguments, load_config

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
    started = time.perf_counter()
    start_serving(config)
    url = f"http://{config.server.host}:{config.server.port}"
    logger.info("ready url=%s model=%s seconds=%.1f", url, config.model.served_name, time.perf_counter() - started)
    stop.wait()
    logger.info("stopping")
    stop_serving()
    return 0


def start_serving(config) -> None:
    """Start (or join) Ray, then deploy the app and wait until every replica is up."""
    environment = local_ray_environment(config.server)
    if environment and "ray" in sys.modules:  # Ray reads it once, on import
        logger.warning("Ray was imported before its listeners could be kept on loopback")
    os.environ.update(environment)
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
    serve.start(http_options=http_options(config.server), logging_config=SERVE_LOGGING)
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
    interface: each Serve replica's inter-deployment gRPC server, which Ray binds to ``[::]:0`` unconditionally
    (ray/serve/_private/replica.py). Not applied when joining a cluster or serving on a non-loopback address,
    nor over a value the user set."""
    from mmrag.serving.openai.edge import is_loopback

    if server.ray_address is not None or not is_loopback(server.host):
        return {}
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")}


def stop_serving() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
