"""The Serve application builder: what ``mmrag serve`` and a RayService's ``serveConfigV2`` import.

``import_path: mmrag.deployments.app:build_app`` with ``args`` holding an mmrag config (the YAML schema of
``MmragConfig``); each stage gets its replicas, autoscaling and resources from ``deployments.<stage>``.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from mmrag.deployments.ingress import OpenAIIngress
from mmrag.deployments.llm import LLMServer
from mmrag.deployments.retriever import RetrieverServer, retriever_options
from mmrag.deployments.vector_stores import vector_stores_deployment
from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.protocol import DEFAULT_ENGINE

# Overload at the HTTP proxy (the ingress queue is full) answers 503 with a retry hint, never a hang.
_BACKPRESSURE = {"status_code": 503, "retry_after_s": 1}


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The import-path builder (Serve requires exactly one parameter: the ``args`` mapping)."""
    return build_application(MmragConfig.model_validate(args or {}))


def build_application(config: MmragConfig, engine_cls: str = DEFAULT_ENGINE) -> Application:
    """The chain for ``config``; ``engine_cls`` (an import path) swaps the engine, e.g. for tests."""
    payload = config.model_dump()
    llm = LLMServer.options(**config.deployments.llm.serve_options()).bind(payload, engine_cls)
    # With several retriever replicas the vector stores run in one more replica, which they forward to.
    # The replica that indexes vector stores asks the LLM to describe image files.
    vector_stores = vector_stores_deployment(config, llm)
    retriever = RetrieverServer.options(**retriever_options(config)).bind(payload, vector_stores, llm)
    ingress_options = {**config.deployments.ingress.serve_options(), "backpressure_config": _BACKPRESSURE}
    return OpenAIIngress.options(**ingress_options).bind(payload, llm, retriever)
