"""How the HTTP layer reaches the vector-store service, which runs where the Milvus connection is.

:class:`VectorStoreBackend` is one call, ``call(method, **kwargs)``, naming a method of
:class:`~mmrag.serving.vector_stores.service.VectorStoreService` from :data:`METHODS`: the Serve ingress
forwards it through the retriever's deployment handle (``RetrievalStage.vector_stores_call``), tests and
single-process servers call a service in this process (:class:`LocalVectorStoreBackend`). Arguments and
results are pydantic models and plain dicts, which cross a handle as they are; errors are ``OpenAIError``s.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Literal, Protocol

from mmrag.serving.errors import InvalidRequestError, NotFoundError

if TYPE_CHECKING:
    from mmrag.serving.vector_stores.service import VectorStoreService

Method = Literal[
    "create_store",
    "list_stores",
    "get_store",
    "update_store",
    "delete_store",
    "attach_file",
    "list_files",
    "get_file",
    "file_content",
    "update_file",
    "delete_file",
    "create_batch",
    "get_batch",
    "search",
    "chat_scope",  # a retriever replica asking the VectorStores replica (deployments/vector_stores.py)
]
METHODS: frozenset[str] = frozenset(Method.__args__)  # type: ignore[attr-defined]


class VectorStoreBackend(Protocol):
    async def call(self, method: Method, /, **kwargs: Any) -> Any: ...


def dispatch(service: VectorStoreService | None, method: str, kwargs: dict[str, Any]) -> Any:
    """Run ``method`` on ``service`` (blocking): only the API's methods, never any other attribute."""
    if service is None:
        # Permanent for this deployment (a 404, as for a route it lacks), not a 503 to retry.
        raise NotFoundError(
            "vector stores are not enabled on this server (vector_stores.enabled, one retriever replica)",
            code="vector_stores_disabled",
        )
    if method not in METHODS:
        raise InvalidRequestError(f"unknown vector store operation {method!r}")
    return getattr(service, method)(**kwargs)


class LocalVectorStoreBackend:
    """A service in this process (tests, batch jobs); its blocking calls run in worker threads."""

    def __init__(self, service: VectorStoreService | None) -> None:
        self.service = service

    async def call(self, method: Method, /, **kwargs: Any) -> Any:
        describer = getattr(self.service, "describer", None)
        if describer is not None:  # the engine of this process runs on this loop: descriptions go here
            describer.bind(asyncio.get_running_loop())
        return await asyncio.to_thread(dispatch, self.service, method, kwargs)


def backend_of(chat_backend: Any) -> VectorStoreBackend | None:
    """The vector-store backend a chat backend offers: its own ``call`` if it has one (a Serve backend), or
    a local one over the service of its in-process retriever stage (``LocalBackend(engine, stage)``), whose
    engine then describes the image files attached (``describe.py``)."""
    if callable(getattr(chat_backend, "vector_stores_call", None)):
        return _Forwarding(chat_backend)
    stage = getattr(chat_backend, "retriever", None)
    if stage is not None and hasattr(stage, "vector_stores"):
        engine = getattr(chat_backend, "engine", None)
        if engine is not None and hasattr(stage, "describe_images_with"):
            stage.describe_images_with(engine.generate)
        return LocalVectorStoreBackend(stage.vector_stores)
    return None


class _Forwarding:
    def __init__(self, chat_backend: Any) -> None:
        self._backend = chat_backend

    async def call(self, method: Method, /, **kwargs: Any) -> Any:
        return await self._backend.vector_stores_call(method, **kwargs)
