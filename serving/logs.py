"""Logging: one line per record, key=value fields, quiet by default (INFO for mmrag, WARNING for vLLM)."""

from __future__ import annotations

import logging
import os

from mmrag.serving.config import ServerConfig

_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"


def configure_logging(server: ServerConfig) -> None:
    """Idempotent: safe in every process (CLI, Serve replicas, vLLM workers)."""
    # vLLM reads its level at import; replicas set it here before the engine is imported.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", server.engine_log_level)
    root = logging.getLogger("mmrag")
    root.setLevel(server.log_level)
    if not any(getattr(h, "_mmrag", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._mmrag = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
