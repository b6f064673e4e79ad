"""``mmrag serve``: start the Serve application in the foreground; Ctrl-C stops it cleanly."""

from __future__ import annotations

import argparse
import logging
import signal
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
    serve.start(
        http_options={
            "host": config.server.host,
            "port": config.server.port,
            "request_timeout_s": config.server.request_timeout_s,
        },
        logging_config=SERVE_LOGGING,
    )
    serve.run(
        build_application(config),
        name="mmrag",
        route_prefix="/",
        logging_config={"log_level": config.server.log_level},
    )


def stop_serving() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
