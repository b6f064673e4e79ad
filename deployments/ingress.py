"""The HTTP ingress: the OpenAI app (``serving/openai/server.py``) over handles to the later stages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.context import _get_internal_replica_context
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from mmrag.deployments.replica import start_replica
from mmrag.serving.engine.protocol import GenerationDelta, GenerationRequest
from mmrag.serving.errors import EngineUnavailableError, OpenAIError, OverloadedError
from mmrag.serving.openai.server import create_app
from mmrag.serving.retrieval.errors import RetrievalError
from mmrag.serving.retrieval.protocol import RetrievalOptions, RetrievalResult

if TYPE_CHECKING:
    from mmrag.serving.retrieval.retriever import Embeddings

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0


class ServeBackend:
    """The ``ChatBackend`` of the HTTP app, reached through Serve deployment handles.

    A stream's deltas come from the LLM replica over Serve's gRPC transport (``_by_reference=False``), and the
    handles route on the event loop that calls them rather than on a router thread of their own. Measured on
    the chain over a paced fake engine (``mmrag bench serving``'s notes in docs/results.md): Ray's
    object-per-item streaming and the hops between the router's thread and the replica's loop cost the LLM
    replica about 1 ms of CPU per token and the ingress about 2; over gRPC on one loop (and with SSE chunks from
    a template), about 0.4 and 0.9. Inside a replica the handles are set up on first use, on the loop that
    serves (the replica's, which lives as long as they do); elsewhere (a driver, a test that runs a loop of its
    own and closes it) they keep Serve's router thread, which ``serve.shutdown`` can stop after that loop is
    gone.
    """

    def __init__(self, llm: DeploymentHandle, retriever: DeploymentHandle):
        self._llm = llm
        self._retriever = retriever
        self._llm_stream: DeploymentHandle | None = None

    def _bind(self) -> DeploymentHandle:
        """The streaming LLM handle; on the first call, both handles are set up to route on this loop."""
        if self._llm_stream is None:
            in_replica = _get_internal_replica_context() is not None
            for handle in (self._llm, self._retriever):
                if in_replica and not handle.is_initialized:  # Ray 2.60: only at set-up, as ``_init``
                    handle._init(_run_router_in_separate_loop=False)
            self._llm_stream = self._llm.options(stream=True, _by_reference=False)
        return self._llm_stream

    async def retrieve(self, options: RetrievalOptions | None, query_text: str) -> RetrievalResult:
        self._bind()
        try:
            return await self._retriever.retrieve.remote(options, query_text)
        except (BackPressureError, RayError) as exc:
            raise client_error(exc, "retrieval") from exc

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        response = self._bind().generate.remote(request)
        finished = False
        try:
            async for delta in response:
                yield delta
            finished = True
        except Exception as exc:  # Ray's errors, gRPC's own (a stream cut by a dying replica), the replica's
            raise client_error(exc, "LLM") from exc
        finally:
            if not finished:  # the client hung up or the stream failed: the engine request is aborted now
                response.cancel()

    async def embed(self, texts: list[str], *, model: str, dimensions: int | None = None) -> Embeddings:
        try:
            return await self._retriever.embed.remote(texts, model=model, dimensions=dimensions)
        except (BackPressureError, RayError) as exc:
            raise client_error(exc, "retrieval") from exc

    async def check_health(self) -> None:
        self._bind()
        try:
            await asyncio.wait_for(self._llm.check_health.remote(), HEALTH_TIMEOUT_S)
        except TimeoutError as exc:
            raise EngineUnavailableError("the LLM stage did not answer in time (loading or restarting?)") from exc
        except (BackPressureError, RayError) as exc:
            raise client_error(exc, "LLM") from exc

    async def engine_metrics(self) -> str:
        self._bind()
        return await asyncio.wait_for(self._llm.metrics_text.remote(), HEALTH_TIMEOUT_S)

    async def vector_stores_call(self, method: str, /, **kwargs: Any) -> Any:
        """A Vector Stores API operation, run by the retriever replica (it owns the Milvus connection)."""
        self._bind()
        try:
            return await self._retriever.vector_stores_call.remote(method, **kwargs)
        except (BackPressureError, RayError) as exc:
            raise client_error(exc, "retrieval") from exc


def client_error(exc: Exception, stage: str) -> Exception:
    """What a client sees when a call to a stage fails.

    A replica's own client-facing error (a 400 naming a field, a retrieval 503) passes through as it was
    raised; a full queue is a 503 with ``Retry-After``; a replica that died under the request (Serve
    restarts it) or any other failure of the call (Ray's, or the gRPC stream's) is a 503, never a 500 or a hang.
    """
    if isinstance(exc, BackPressureError):
        return OverloadedError(f"the {stage} stage is at capacity")
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, OpenAIError | RetrievalError):
        return exc.cause
    if isinstance(exc, OpenAIError | RetrievalError):  # over gRPC a replica's own error arrives unwrapped
        return exc
    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    # Ray's text carries tracebacks, node addresses and file paths: the log gets it, the client the kind.
    logger.warning("the %s stage failed: %s: %s", stage, type(cause).__name__, cause)
    return EngineUnavailableError(f"the {stage} stage failed; retry shortly")


@serve.deployment(name="OpenAIIngress")
@serve.ingress()
class OpenAIIngress:
    def __init__(self, config: dict[str, Any], llm: DeploymentHandle, retriever: DeploymentHandle):
        self.config = start_replica(config)
        self.backend = ServeBackend(llm, retriever)

    def __serve_build_asgi_app__(self):
        return create_app(self.config, self.backend)
