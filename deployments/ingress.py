"""The HTTP ingress: the OpenAI app (``serving/openai/server.py``) over handles to the later stages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.protocol import GenerationDelta, GenerationRequest
from mmrag.serving.logs import configure_logging
from mmrag.serving.openai.errors import EngineUnavailableError, OpenAIError, OverloadedError
from mmrag.serving.openai.server import create_app
from mmrag.serving.retrieval.errors import RetrievalError
from mmrag.serving.retrieval.protocol import RetrievalOptions, RetrievalResult

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
        except BackPressureError as exc:
            raise OverloadedError(f"the retrieval stage is at capacity: {exc}") from exc
        except RayTaskError as exc:
            raise unwrap(exc) from exc

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        try:
            async for delta in self._llm_stream.generate.remote(request):
                yield delta
        except BackPressureError as exc:
            raise OverloadedError(f"the LLM stage is at capacity: {exc}") from exc
        except RayTaskError as exc:
            raise unwrap(exc) from exc

    async def check_health(self) -> None:
        try:
            await asyncio.wait_for(self._llm.check_health.remote(), HEALTH_TIMEOUT_S)
        except TimeoutError as exc:
            raise EngineUnavailableError("the LLM stage did not answer in time (still loading?)") from exc
        except RayTaskError as exc:
            raise unwrap(exc) from exc

    async def engine_metrics(self) -> str:
        return await asyncio.wait_for(self._llm.metrics_text.remote(), HEALTH_TIMEOUT_S)


def unwrap(exc: RayTaskError) -> Exception:
    """The client-facing error a replica raised, or a 503 for a replica that died under the request."""
    cause = exc.cause
    if isinstance(cause, OpenAIError | RetrievalError):
        return cause
    return EngineUnavailableError(f"a stage failed: {type(cause).__name__}: {cause}")


@serve.deployment(name="OpenAIIngress")
@serve.ingress()
class OpenAIIngress:
    def __init__(self, config: dict[str, Any], llm: DeploymentHandle, retriever: DeploymentHandle):
        self.config = MmragConfig.model_validate(config)
        configure_logging(self.config.server)
        self.backend = ServeBackend(llm, retriever)

    def __serve_build_asgi_app__(self):
        return create_app(self.config, self.backend)
