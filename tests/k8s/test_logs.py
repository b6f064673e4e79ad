"""Logs reach `kubectl logs`: Ray's processes write to the container's stderr, and inside a Serve replica mmrag's
records go through Serve's logger (its replica file and stream, with the replica and request ids)."""

from __future__ import annotations

import logging

import pytest

from mmrag.serving import logs
from mmrag.serving.config import ServerConfig
from tests.k8s.manifests import OVERLAYS, only, render


@pytest.fixture
def fresh_mmrag_logger(monkeypatch):
    logger = logging.getLogger("mmrag")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)
    level = logger.level
    yield logger
    # configure_logging sets the level; left at WARNING, later tests' INFO records never reach caplog (and
    # setLevel, unlike restoring the attribute, clears the loggers' cached decisions).
    logger.setLevel(level)


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_in_a_replica_records_go_to_serves_logger(fresh_mmrag_logger, monkeypatch):
    serve_logger = logging.getLogger(logs.SERVE_LOGGER)
    capture = Capture()
    monkeypatch.setattr(serve_logger, "handlers", [capture])
    monkeypatch.setattr(logs, "in_serve_replica", lambda: True)
    logs.configure_logging(ServerConfig())
    logs.configure_logging(ServerConfig())  # idempotent
    logging.getLogger("mmrag.deployments.ingress").warning("the LLM stage failed")
    assert [r.getMessage() for r in capture.records] == ["the LLM stage failed"]
    assert len(fresh_mmrag_logger.handlers) == 1 and fresh_mmrag_logger.propagate is False


def test_outside_serve_records_go_to_a_stream_of_our_own(fresh_mmrag_logger, monkeypatch):
    monkeypatch.setattr(logs, "in_serve_replica", lambda: False)
    logs.configure_logging(ServerConfig(log_level="WARNING"))
    (handler,) = fresh_mmrag_logger.handlers
    assert isinstance(handler, logging.StreamHandler) and fresh_mmrag_logger.level == logging.WARNING


def test_not_in_a_replica_here():
    assert logs.in_serve_replica() is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_writes_to_the_containers_stderr(overlay):
    objects = render(f"overlays/{overlay}")
    env = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("mmrag-env"))
    assert env["data"]["RAY_LOG_TO_STDERR"] == "1"
    assert env["data"]["RAY_SERVE_LOG_TO_STDERR"] == "1"
    assert only(objects, "RayService", "mmrag")
