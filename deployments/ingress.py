"""The HTTP ingress: the OpenAI app (``serving/openai/server.py``) over handles to the later stages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.protocol import GenerationDelta, GenerationRequest
from mmrag.serving.errors import EngineUnavailableError, OpenAIError, OverloadedError
from mmrag.serving.logs import configure_logging
from mmrag.serving.openai.server import create_app
from mmrag.serving.retrieval.errors import RetrievalError
from mmrag.serving.retrieval.protocol import RetrievalOptions, RetrievalResult

if TYPE_CHECKING:
    from mmrag.serving.retrieval.retriever import Embeddings

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0


class ServeBackend:
    """The ``ChatBackend`` of the HTTP app, reached through Serve deployment handles."""

    def __init__(self, llm: DeploymentHandle, retriever: DeploymentHandle):
        self._llm = llm
        self._llm_stream = llm.options(stream=True)
        self._retriever = retriever

    async def retrieve(self, options: RetrievalOptions | None, query_text: str) -> RetrievalResult:
        try:
            return await self._retriever.retrieve.remote(options, query_text)
        except (BackPressureError, RayError) as exc:
            raise client_error(exc, "retrieval") from exc

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        try:
            async for delta in self._llm_stream.generate.remote(request):
                yield delta
        except (BackPressureError, RayError) as exc:
            raise client_error(exc, "LLM") from exc

    async def embed(self, texts: list[str], *, model: str, dimensions: int | None = None) -> Embeddings:
        try:
            return await self._retriever.embed.remote(texts, model=model, dimensions=dimensions)
        except (BackPressureError, RayError) as exc:
            raise client_error(exc, "retrieval") from exc

    async def check_health(self) -> None:
        try:
            await asyncio.wait_for(self._llm.check_health.remote(), HEALTH_TIMEOUT_S)
        except TimeoutError as exc:
            raise EngineUnavailableError("the LLM stage did not answer in time (loading or restarting?)") from exc
        except (BackPressureError, RayError) as exc:
            raise client_error(exc, "LLM") from exc

    async def engine_metrics(self) -> str:
        return await asyncio.wait_for(self._llm.metrics_text.remote(), HEALTH_TIMEOUT_S)

    async def vector_stores_call(self, method: str, /, **kwargs: Any) -> Any:
        """A Vector Stores API operation, run by the retriever replica (it owns the Milvus connection)."""
        try:
            return await self._retriever.vector_stores_call.remote(method, **kwargs)
        except (BackPressureError, RayError) as exc:
            raise client_error(exc, "retrieval") from exc


def client_error(exc: Exception, stage: str) -> Exception:
    """What a client sees when a call to a stage fails.

    A replica's own client-facing error (a 400 naming a field, a retrieval 503) passes through as it was
    raised; a full queue is a 503 with ``Retry-After``; a replica that died under the request (Serve
    restarts it) or any other Ray failure is a 503, never a 500 or a hang.
    """
    if isinstance(exc, BackPressureError):
        return OverloadedError(f"the {stage} stage is at capacity")
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, OpenAIError | RetrievalError):
        return exc.cause
    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    # Ray's text carries tracebacks, node addresses and file paths: the log gets it, the client the kind.
    logger.warning("the %s stage failed: %s: %s", stage, type(cause).__name__, cause)
    return EngineUnavailableError(f"the {stage} stage failed; retry shortly")


@serve.deployment(name="OpenAIIngress")
@serve.ingress()
class OpenAIIngress:
    def __init__(self, config: dict[str, Any], llm: DeploymentHandle, retriever: DeploymentHandle):
        self.config = MmragConfig.model_validate(config)
        configure_logging(self.config.server)
        self.backend = ServeBackend(llm, retriever)

    def __serve_build_asgi_app__(self):
        return create_app(self.config, self.backend)
