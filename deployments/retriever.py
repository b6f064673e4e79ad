"""The retriever stage: one replica owns one encoder and one Milvus connection.

The ingress calls ``await handle.retrieve.remote(options, query_text)`` and gets a ``RetrievalResult``;
typed ``RetrievalError``s raised here reach the ingress as the same classes (Ray re-raises a replica's
exception as a subclass of its type), each with the HTTP ``status_code`` to answer with.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from mmrag.serving.config import MmragConfig
from mmrag.serving.retrieval.errors import RetrievalUnavailableError
from mmrag.serving.retrieval.protocol import RetrievalOptions, RetrievalResult

logger = logging.getLogger(__name__)


class Retriever:
    """Plain class (tests build it directly); :data:`RetrieverServer` is its Serve deployment."""

    def __init__(self, config: dict[str, Any] | MmragConfig) -> None:
        from mmrag.serving.retrieval.demo import ensure_demo_corpus
        from mmrag.serving.retrieval.retriever import Retriever as Core

        self.config = config if isinstance(config, MmragConfig) else MmragConfig.model_validate(config)
        self.core = Core(self.config.retrieval)
        if self.config.retrieval.ingest_demo_corpus:
            try:
                summary = ensure_demo_corpus(self.config, store=self.core.store(), encoder=self.core.encoder)
                if summary is not None:
                    logger.info("demo corpus ingested: %s", summary.describe())
            except RetrievalUnavailableError as exc:
                # Milvus may come up later; requests then fail or degrade per retrieval.on_failure.
                logger.warning("demo corpus not ingested: %s", exc)
        try:
            # Fail the deployment now, not every request later, if the default collection was filled
            # by another encoder: that is a server configuration error, not the client's.
            self.core.check_collection(self.config.retrieval.collection)
        except RetrievalUnavailableError as exc:
            logger.warning("default collection not checked: %s", exc)

    async def retrieve(self, options: RetrievalOptions | dict | None, query_text: str) -> RetrievalResult:
        return await self.core.retrieve(options, query_text)

    async def check_health(self) -> None:
        """Unhealthy only when an embedded Milvus Lite stops answering (a restart reopens it); a remote
        Milvus outage is not this replica's fault, and restarting it would not help."""
        if self.config.retrieval.is_lite():
            await asyncio.to_thread(self.core.check_health)

    def __del__(self) -> None:
        core = getattr(self, "core", None)
        if core is not None:
            core.close()


RetrieverServer = serve.deployment(name="Retriever")(Retriever)


def retriever_options(config: MmragConfig) -> dict[str, Any]:
    """``Deployment.options`` for the retriever; refuses several replicas on one Milvus Lite file."""
    options = config.deployments.retriever.serve_options()
    if config.retrieval.is_lite():
        most = options.get("autoscaling_config", {}).get("max_replicas", options.get("num_replicas", 1))
        if most > 1:
            raise ValueError(
                "Milvus Lite allows one process per file: deployments.retriever must have one replica "
                "(or set retrieval.uri to a Milvus server)"
            )
    return options
