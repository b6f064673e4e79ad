"""The retrieval stage of the chain: what a retriever replica (or a batch job) holds and answers."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING, Any

from mmrag.serving.config import MmragConfig
from mmrag.serving.errors import InvalidRequestError
from mmrag.serving.retrieval.errors import RetrievalUnavailableError
from mmrag.serving.retrieval.protocol import RetrievalOptions, RetrievalResult

if TYPE_CHECKING:
    from mmrag.serving.vector_stores.describe import Generate, ImageDescriber
    from mmrag.serving.vector_stores.service import VectorStoreService

logger = logging.getLogger(__name__)


class RetrievalStage:
    """One encoder and one Milvus connection, with the demo corpus and the collection checked at start.

    Plain class: the Serve deployment :data:`mmrag.deployments.retriever.RetrieverServer` wraps it, batch
    jobs and tests build it directly. ``generate``: how the served model is reached (the LLM deployment's
    handle, an engine of this process) to describe the image files attached to vector stores; None: images
    are indexed without the model's description.
    """

    def __init__(self, config: dict[str, Any] | MmragConfig, generate: Generate | None = None) -> None:
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
        self._vector_stores: VectorStoreService | None = None
        self._vector_stores_lock = threading.Lock()
        from mmrag.serving.vector_stores.config import vector_stores_enabled

        self._vector_stores_on = vector_stores_enabled(self.config)
        self._describer: ImageDescriber | None = None
        if self._vector_stores_on:
            self.describe_images_with(generate)
        records = self.config.vector_stores.resolved_records_path(self.config.retrieval)
        if self._vector_stores_on and records.exists():
            _ = self.vector_stores  # records from an earlier run: recover interrupted ingestions now

    @property
    def vector_stores(self) -> VectorStoreService | None:
        """The Vector Stores API's service (made on first use; None when ``vector_stores.enabled`` is off)."""
        if not self._vector_stores_on:
            return None
        with self._vector_stores_lock:
            if self._vector_stores is None:
                from mmrag.serving.vector_stores.service import VectorStoreService

                self._vector_stores = VectorStoreService(self.config, self.core, describer=self._describer)
            return self._vector_stores

    def describe_images_with(self, generate: Generate | None) -> None:
        """Describe image files with ``generate`` from now on (None: no longer); see ``describe.py``."""
        from mmrag.serving.vector_stores.describe import describer_for

        self._describer = describer_for(self.config, generate)
        if self._vector_stores is not None:
            self._vector_stores.describer = self._describer

    def bind_describer(self) -> None:
        """Called on the event loop that runs the model (the replica's, the app's): descriptions run there."""
        if self._describer is not None:
            self._describer.bind(asyncio.get_running_loop())

    async def vector_stores_call(self, method: str, /, **kwargs: Any) -> Any:
        """One Vector Stores API operation (the ingress's ``VectorStoreBackend`` reaches it through the handle)."""
        from mmrag.serving.vector_stores.backend import dispatch

        self.bind_describer()
        return await asyncio.to_thread(lambda: dispatch(self.vector_stores, method, kwargs))

    async def retrieve(self, options: RetrievalOptions | dict | None, query_text: str) -> RetrievalResult:
        if not isinstance(options, RetrievalOptions):
            options = RetrievalOptions.model_validate(options or {})
        scope = None
        if options.vector_store_ids and options.mode != "none":
            from mmrag.serving.vector_stores.access import options_owner

            # The key's id, which the ingress put on the options (OwnedRetrievalOptions): its stores only.
            scope = await asyncio.to_thread(self._vector_store_scope, options.vector_store_ids, options_owner(options))
        return await self.core.retrieve(options, query_text, scope=scope)

    def _vector_store_scope(self, store_ids: list[str], owner: str | None = None) -> tuple[str, str]:
        service = self.vector_stores
        if service is None:
            raise InvalidRequestError(
                "vector stores are not enabled on this server (vector_stores.enabled, one retriever replica)",
                param="retrieval.vector_store_ids",
            )
        return service.chat_scope(list(dict.fromkeys(store_ids)), owner=owner)

    async def check_health(self) -> None:
        """Unhealthy only when a Milvus Lite opened in this process stops answering (a restart reopens it); a
        remote Milvus outage is not this replica's fault, and restarting it would not help, nor for the Lite
        server that `mmrag serve` supervises (``retrieval.lite_server_uri``): it restarts that, and the
        ingress's ``/health`` reports it down meanwhile."""
        if self.config.retrieval.is_lite() and not self.config.retrieval.shares_lite():
            await asyncio.to_thread(self.core.check_health)

    def __del__(self) -> None:
        service = getattr(self, "_vector_stores", None)
        if service is not None:
            try:
                service.close(wait=False)
            except Exception:  # at interpreter exit the thread pool's module may already be torn down
                logger.debug("closing the vector-store service failed", exc_info=True)
        core = getattr(self, "core", None)
        if core is not None:
            core.close()
