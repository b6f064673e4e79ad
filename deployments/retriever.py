"""The retriever stage: one replica owns one encoder and one Milvus connection.

The ingress calls ``await handle.retrieve.remote(options, query_text)`` and gets a ``RetrievalResult``, and
``await handle.embed.remote(texts, model=..., dimensions=...)`` for ``/v1/embeddings``;
typed ``RetrievalError``s raised here reach the ingress as the same classes (Ray re-raises a replica's
exception as a subclass of its type), each with the HTTP ``status_code`` to answer with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray import serve

from mmrag.deployments.loopback import keep_replica_grpc_on_loopback
from mmrag.deployments.vector_stores import ForwardsVectorStores
from mmrag.serving.config import MmragConfig
from mmrag.serving.retrieval.stage import RetrievalStage
from mmrag.serving.vector_stores.config import vector_stores_enabled

if TYPE_CHECKING:
    from mmrag.serving.retrieval.retriever import Embeddings


class RetrieverReplica(ForwardsVectorStores, RetrievalStage):
    """The stage as a replica serves it, plus ``/v1/embeddings``: the texts are encoded by the encoder that
    fills and searches the collections (in a worker thread of this replica)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        keep_replica_grpc_on_loopback()
        super().__init__(*args, **kwargs)

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
