"""The retriever stage: one replica owns one encoder and one Milvus connection.

The ingress calls ``await handle.retrieve.remote(options, query_text)`` and gets a ``RetrievalResult``, and
``await handle.embed.remote(texts, model=..., dimensions=...)`` for ``/v1/embeddings``;
typed ``RetrievalError``s raised here reach the ingress as the same classes (Ray re-raises a replica's
exception as a subclass of its type), each with the HTTP ``status_code`` to answer with.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ray import serve

from mmrag.deployments.replica import start_replica
from mmrag.deployments.vector_stores import ForwardsVectorStores
from mmrag.serving.config import MmragConfig
from mmrag.serving.retrieval.stage import RetrievalStage
from mmrag.serving.vector_stores.config import vector_stores_enabled

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from mmrag.serving.retrieval.retriever import Embeddings

logger = logging.getLogger(__name__)


class RetrieverReplica(ForwardsVectorStores, RetrievalStage):
    """The stage as a replica serves it, plus ``/v1/embeddings``: the texts are encoded by the encoder that
    fills and searches the collections (in a worker thread of this replica)."""

    def __init__(
        self,
        config: dict[str, Any],
        vector_stores: DeploymentHandle | None = None,
        llm: DeploymentHandle | None = None,
    ) -> None:
        config = start_replica(config)
        started = time.perf_counter()
        super().__init__(config, vector_stores, llm)  # the encoder, Milvus, and the demo corpus on a first start
        logger.info("retriever replica started in %.1f s", time.perf_counter() - started)

    async def embed(self, texts: list[str], *, model: str, dimensions: int | None = None) -> Embeddings:
        return await self.core.embed(texts, model=model, dimensions=dimensions)


RetrieverServer = serve.deployment(name="Retriever")(RetrieverReplica)


def retriever_options(config: MmragConfig) -> dict[str, Any]:
    """``Deployment.options`` for the retriever; refuses several replicas on a Milvus Lite path opened in-process
    (several are fine on the Lite server that ``mmrag serve`` runs, ``retrieval.lite_server_uri``)."""
    options = config.deployments.retriever.serve_options()
    vector_stores_enabled(config)  # refuses vector stores over several replicas on a Milvus server
    if config.retrieval.is_lite() and not config.retrieval.shares_lite():
        most = options.get("autoscaling_config", {}).get("max_replicas", options.get("num_replicas", 1))
        if most > 1:
            raise ValueError(
                "Milvus Lite opened in-process allows one process at a time: deployments.retriever must have one "
                "replica (or serve with `mmrag serve` and retrieval.milvus_lite_server on, which shares the Lite "
                "path through a Lite server, or set retrieval.uri to a Milvus server)"
            )
    return options
