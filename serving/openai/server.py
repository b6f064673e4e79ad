"""The OpenAI-compatible HTTP surface, as a FastAPI app over a :class:`ChatBackend`.

The app knows nothing about Ray: the Serve ingress gives it a backend that calls the LLM deployment
through a handle; tests give it one that calls an :class:`~mmrag.serving.engine.protocol.Engine`
in-process. Every error leaves as ``{"error": {...}}`` with its status; an error after a stream has
started is sent as a final SSE event, then ``[DONE]``.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.protocol import Engine, GenerationDelta, GenerationRequest
from mmrag.serving.metrics import IngressMetrics
from mmrag.serving.openai import chat
from mmrag.serving.openai.errors import (
    AuthenticationError,
    EngineUnavailableError,
    InvalidRequestError,
    OpenAIError,
    PayloadTooLargeError,
    ServiceUnavailableError,
)
from mmrag.serving.openai.protocol import (
    ChatCompletionRequest,
    ModelCard,
    ModelList,
    format_error_location,
    new_completion_id,
    now,
)
from mmrag.serving.retrieval.errors import RetrievalError
from mmrag.serving.retrieval.protocol import (
    RetrievalOptions,
    RetrievalResult,
    query_text_from_messages,
    resolve_options,
)

logger = logging.getLogger(__name__)


class ChatBackend(Protocol):
    """What the HTTP layer needs from the rest of the chain."""

    async def retrieve(self, options: RetrievalOptions | None, query_text: str) -> RetrievalResult: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]: ...

    async def check_health(self) -> None: ...

    async def engine_metrics(self) -> str: ...


class LocalBackend:
    """A backend over an engine in this process (tests, single-process tools)."""

    def __init__(self, engine: Engine, retriever: Any = None):
        self.engine = engine
        self.retriever = retriever  # anything with ``async retrieve(options, query_text)``

    async def retrieve(self, options: RetrievalOptions | None, query_text: str) -> RetrievalResult:
        if self.retriever is None:
            raise ServiceUnavailableError("retrieval is not configured on this server", param="retrieval")
        return await self.retriever.retrieve(options, query_text)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        return self.engine.generate(request)

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def engine_metrics(self) -> str:
        return self.engine.metrics_text()


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers)


def create_app(config: MmragConfig, backend: ChatBackend) -> FastAPI:
    app = FastAPI(title="mmrag", version="0.1.0")
    metrics = IngressMetrics()
    started = now()
    api_keys = [key.encode() for key in config.server.accepted_api_keys()]

    @app.middleware("http")
    async def _authenticate(request: Request, call_next):
        # /health and /metrics stay open for probes and scrapers; the API needs a key when keys are set.
        if api_keys and request.url.path.startswith("/v1/") and not _has_valid_key(request, api_keys):
            return error_response(AuthenticationError("invalid or missing API key", code="invalid_api_key"))
        return await call_next(request)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes and wrong methods answer in the same shape as every other error.
        error = {"message": str(exc.detail), "type": "invalid_request_error", "param": None, "code": None}
        return JSONResponse({"error": error}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/health")
    async def health() -> Response:
        try:
            await backend.check_health()
        except Exception as exc:
            logger.warning("health check failed: %s", exc)
            return error_response(EngineUnavailableError(f"not ready: {exc}"))
        return PlainTextResponse("ok")

    @app.get("/v1/models")
    async def models() -> ModelList:
        card = ModelCard(id=config.model.served_name, created=started, max_model_len=config.engine.max_model_len)
        return ModelList(data=[card])

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        try:
            engine_text = await backend.engine_metrics()
        except Exception as exc:  # the ingress's own metrics stay visible while the engine is down
            engine_text = f"# engine metrics unavailable: {type(exc).__name__}\n"
        return PlainTextResponse(metrics.exposition() + engine_text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: Request) -> Response:
        start = time.perf_counter()
        metrics.in_flight.inc()
        try:
            response = await _chat(http_request, start)
        except OpenAIError as exc:
            response = error_response(exc)
        except Exception:
            logger.exception("unhandled error in chat completion")
            response = error_response(OpenAIError("internal server error"))
        finally:
            metrics.in_flight.dec()
        metrics.requests.labels(status=str(response.status_code)).inc()
        if not isinstance(response, StreamingResponse):
            metrics.latency.observe(time.perf_counter() - start)
        return response

    async def _chat(http_request: Request, start: float) -> Response:
        request = parse_chat_request(await read_body(http_request, config.limits.max_request_bytes))
        completion_id = new_completion_id()
        generation = await chat.prepare_generation(request, config, request_id=completion_id)
        generation.retrieval = await retrieve_for(request, generation, config, backend)
        deltas = backend.generate(generation)
        ids = {"completion_id": completion_id, "created": now(), "model": request.model}
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            first = await _first_delta(deltas)  # raises before any byte is sent: a clean 4xx
            metrics.ttft.observe(time.perf_counter() - start)
            events = sse_events(first, deltas, include_usage=include_usage, metrics=metrics, start=start, **ids)
            return StreamingResponse(events, media_type="text/event-stream")
        completion = await chat.collect_completion(_timed(deltas, start), n=request.n, **ids)
        metrics.observe_usage(completion.usage)
        return JSONResponse(completion.model_dump())

    async def _timed(deltas: AsyncIterator[GenerationDelta], start: float) -> AsyncIterator[GenerationDelta]:
        first = True
        async for delta in deltas:
            if first:
                metrics.ttft.observe(time.perf_counter() - start)
                first = False
            yield delta

    app.openapi = lambda: openapi_with_chat_body(app)
    return app


def openapi_with_chat_body(app: FastAPI) -> dict[str, Any]:
    """The generated OpenAPI document plus the chat request body, which the route parses itself (to
    answer bad bodies in the OpenAI error shape) and FastAPI therefore cannot see."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        body = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(body.pop("$defs", {}))
        components["ChatCompletionRequest"] = body
        schema["paths"]["/v1/chat/completions"]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}},
        }
        app.openapi_schema = schema
    return app.openapi_schema


async def retrieve_for(
    request: ChatCompletionRequest, generation: GenerationRequest, config: MmragConfig, backend: ChatBackend
) -> RetrievalResult | None:
    """Run the retrieval stage when the request (or the server default) asks for it."""
    try:
        if resolve_options(request.retrieval, config.retrieval).mode == "none":
            return None
        return await backend.retrieve(request.retrieval, query_text_from_messages(generation.messages))
    except RetrievalError as exc:
        raise as_openai_error(exc) from exc


def as_openai_error(exc: RetrievalError) -> OpenAIError:
    if exc.status_code < 500:
        return InvalidRequestError(exc.message, param=exc.field or "retrieval")
    return ServiceUnavailableError(f"retrieval unavailable: {exc.message}", param=exc.field or "retrieval")


def _has_valid_key(request: Request, api_keys: list[bytes]) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    # Compare against every key in constant time: no early exit that leaks which prefix matched.
    return any([hmac.compare_digest(token.encode(), key) for key in api_keys])


async def read_body(http_request: Request, max_bytes: int) -> bytes:
    declared = http_request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(f"request body larger than {max_bytes} bytes")
    body = bytearray()
    async for chunk in http_request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLargeError(f"request body larger than {max_bytes} bytes")
    return bytes(body)


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:
        # The deepest location is the most specific one when a union reports every branch.
        error = max(exc.errors(), key=lambda e: len(e["loc"]))
        param = format_error_location(error["loc"])
        raise InvalidRequestError(f"{param}: {error['msg']}", param=param or None) from exc


async def _first_delta(deltas: AsyncIterator[GenerationDelta]) -> GenerationDelta | None:
    try:
        return await anext(deltas)
    except StopAsyncIteration:
        return None


async def sse_events(
    first: GenerationDelta | None,
    deltas: AsyncIterator[GenerationDelta],
    *,
    include_usage: bool,
    metrics: IngressMetrics,
    start: float,
    completion_id: str,
    created: int,
    model: str,
) -> AsyncIterator[str]:
    ids = {"completion_id": completion_id, "created": created, "model": model}
    started: set[int] = set()
    last = first
    try:
        if first is not None:
            started.add(first.index)
            yield _sse(chat.chunk_of(first, first=True, **ids).model_dump())
            async for delta in deltas:
                yield _sse(chat.chunk_of(delta, first=delta.index not in started, **ids).model_dump())
                started.add(delta.index)
                last = delta
        if include_usage:
            yield _sse(chat.usage_chunk(last, **ids).model_dump())
    except OpenAIError as exc:
        yield _sse(exc.to_dict())
    except Exception:
        logger.exception("error while streaming")
        yield _sse(OpenAIError("internal server error").to_dict())
    finally:
        if last is not None:
            metrics.observe_usage(chat.usage_of(last))
        metrics.latency.observe(time.perf_counter() - start)
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
