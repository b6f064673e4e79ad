"""The retrieval stage of the chain: what a retriever replica (or a batch job) holds and answers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mmrag.serving.config import MmragConfig
from mmrag.serving.retrieval.errors import RetrievalUnavailableError
from mmrag.serving.retrieval.protocol import RetrievalOptions, RetrievalResult

logger = logging.getLogger(__name__)


class RetrievalStage:
    """One encoder and one Milvus connection, with the demo corpus and the collection checked at start.

    Plain class: the Serve deployment :data:`mmrag.deployments.retriever.RetrieverServer` wraps it, batch
    jobs and tests build it directly.
    """

    def __init__(self, config: dict[str, Any] | MmragConfig) -> None:
        # Imported here: the ingress imports this module (through the app builder) and needs neither.
        from mmrag.serving.retrieval.demo import ensure_demo_corpus
        from mmrag.serving.retrieval.retriever import Retriever

        self.config = config if isinstance(config, MmragConfig) else MmragConfig.model_validate(config)
        self.core = Retriever(self.config.retrieval)
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
