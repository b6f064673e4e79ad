"""Vector stores beside a retriever of several replicas: one more deployment, ``VectorStores``, of one replica.

A store's records (SQLite) and its files' ingestion jobs belong to one process (``vector_stores/records.py``
says why), which is the retriever replica when there is one. With several (on Milvus Lite that ``mmrag serve``
runs as a server, which they all share), none of them owns the records: a ``VectorStores`` replica does,
with its own encoder and Milvus connection, and every retriever replica forwards to it both the Vector Stores
API calls that reach it and the scope lookup of a chat request that names stores (then searches Milvus
itself). The ingress keeps one handle, the retriever's; one more hop for these calls only.

Whichever replica owns the stores holds a handle to the LLM deployment too: it asks the served model to
describe each image file it indexes (``serving/vector_stores/describe.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from mmrag.deployments.replica import start_replica
from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.protocol import GenerationDelta, GenerationRequest
from mmrag.serving.errors import OpenAIError
from mmrag.serving.retrieval.errors import RetrievalError
from mmrag.serving.retrieval.protocol import RetrievalOptions, RetrievalResult
from mmrag.serving.retrieval.stage import RetrievalStage
from mmrag.serving.vector_stores.config import separate_vector_stores


class VectorStoresReplica(RetrievalStage):
    def __init__(self, config: dict[str, Any], llm: DeploymentHandle | None = None) -> None:
        super().__init__(start_replica(config), handle_generate(llm) if llm is not None else None)


def handle_generate(llm: DeploymentHandle):
    """The LLM deployment's ``generate`` through ``llm``, as an engine's (what image descriptions call): the
    stream of one request's deltas, cancelled at the LLM when its reader stops early (a timeout)."""
    stream = llm.options(stream=True)

    async def generate(request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        response = stream.generate.remote(request)
        finished = False
        try:
            async for delta in response:
                yield delta
            finished = True
        finally:
            if not finished:
                response.cancel()

    return generate


VectorStoreServer = serve.deployment(name="VectorStores")(VectorStoresReplica)


def vector_stores_deployment(config: MmragConfig, llm: Any = None) -> Any | None:
    """The bound ``VectorStores`` deployment for ``config`` (``llm``: the bound LLM deployment, which describes
    image files), or None when the retriever serves the stores itself (one replica) or nobody does (they are
    off)."""
    if not separate_vector_stores(config):
        return None
    options = config.deployments.retriever.serve_options()
    options.pop("autoscaling_config", None)
    # The retriever replicas fill the demo corpus; this one has none to add.
    retrieval = config.retrieval.model_copy(update={"ingest_demo_corpus": False})
    payload = config.model_copy(update={"retrieval": retrieval}).model_dump()
    return VectorStoreServer.options(**{**options, "num_replicas": 1}).bind(payload, llm)


class ForwardsVectorStores:
    """Mixin of the retriever replica's class (before ``RetrievalStage``): given the ``VectorStores`` handle,
    the replica keeps no vector-store service of its own and forwards to that one. ``llm``: the LLM
    deployment, which describes the image files of the stores this replica serves itself."""

    def __init__(
        self,
        config: dict[str, Any] | MmragConfig,
        vector_stores: DeploymentHandle | None = None,
        llm: DeploymentHandle | None = None,
    ) -> None:
        self._vector_stores_handle = vector_stores
        if vector_stores is not None:
            config = config if isinstance(config, MmragConfig) else MmragConfig.model_validate(config)
            off = config.vector_stores.model_copy(update={"enabled": False})
            config = config.model_copy(update={"vector_stores": off})
        generate = handle_generate(llm) if llm is not None and vector_stores is None else None
        super().__init__(config, generate)  # type: ignore[call-arg]

    async def vector_stores_call(self, method: str, /, **kwargs: Any) -> Any:
        if self._vector_stores_handle is None:
            return await super().vector_stores_call(method, **kwargs)  # type: ignore[misc]
        return await self._forward(method, **kwargs)

    async def retrieve(self, options: RetrievalOptions | dict | None, query_text: str) -> RetrievalResult:
        if self._vector_stores_handle is None:
            return await super().retrieve(options, query_text)  # type: ignore[misc]
        from mmrag.serving.vector_stores.access import options_owner

        if not isinstance(options, RetrievalOptions):
            options = RetrievalOptions.model_validate(options or {})
        scope = None
        if options.vector_store_ids and options.mode != "none":
            store_ids = list(dict.fromkeys(options.vector_store_ids))
            scope = tuple(await self._forward("chat_scope", store_ids=store_ids, owner=options_owner(options)))
        return await self.core.retrieve(options, query_text, scope=scope)  # type: ignore[attr-defined]

    async def _forward(self, method: str, /, **kwargs: Any) -> Any:
        try:
            return await self._vector_stores_handle.vector_stores_call.remote(method, **kwargs)
        except RayTaskError as exc:
            # The service's own client-facing error (a 404 naming the field, a 503) reaches the ingress as it
            # was raised, not wrapped twice; any other failure is the ingress's 503.
            if isinstance(exc.cause, OpenAIError | RetrievalError):
                raise exc.cause from None
            raise
