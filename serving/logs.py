"""Logging: one line per record, key=value fields, quiet by default (INFO for mmrag, WARNING for vLLM).

Inside a Ray Serve replica mmrag's records go to Serve's own logger instead (its replica log file under
``/tmp/ray/session_latest/logs/serve/`` and its stderr stream, with the replica and request ids), where Serve's
and Ray's tools look for a replica's logs; a handler of our own would bypass them.
"""

from __future__ import annotations

import logging
import os
import sys

from mmrag.serving.config import ServerConfig

_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"
SERVE_LOGGER = "ray.serve"  # the logger Serve configures in each replica (handlers, format, context fields)


class ToServeLogger(logging.Handler):
    """Hands each record to Serve's logger, whose handlers (the replica's file, stderr) are looked up per record:
    Serve replaces them when its logging config changes."""

    _mmrag = True

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(SERVE_LOGGER).handle(record)


def in_serve_replica() -> bool:
    """A process that has not imported Ray is not a replica, and pays no import to find out."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    try:
        from ray import serve

        serve.get_replica_context()
        return True
    except Exception:  # RayServeException: a Ray driver or task, not a replica
        return False


def configure_logging(server: ServerConfig) -> None:
    """Idempotent: safe in every process (CLI, Serve replicas, vLLM workers)."""
    # vLLM reads its level at import; replicas set it here before the engine is imported.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", server.engine_log_level)
    root = logging.getLogger("mmrag")
    root.setLevel(server.log_level)
    if any(getattr(h, "_mmrag", False) for h in root.handlers):
        return
    if in_serve_replica():
        handler: logging.Handler = ToServeLogger()
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._mmrag = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.propagate = False
