"""The OpenAI-compatible HTTP surface: a FastAPI app, a thin adapter over the chat pipeline.

Requests go through :class:`~mmrag.serving.pipeline.ChatPipeline`; this module adds what is HTTP's:
body reading (JSON only, within a size and a time limit), SSE streaming, status codes and Prometheus
metrics; the checks made before any route runs (API keys, Host, Origin) are in :mod:`.edge`. It knows nothing about
Ray: the Serve ingress gives it a backend that calls the deployments through handles; tests give it a
:class:`~mmrag.serving.pipeline.LocalBackend` over an in-process engine. Every error leaves as
``{"error": {...}}`` with its status; an error after a stream has started is sent as a final SSE event,
then ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.protocol import GenerationDelta
from mmrag.serving.errors import (
    EngineUnavailableError,
    InvalidRequestError,
    OpenAIError,
    PayloadTooLargeError,
    clip,
)
from mmrag.serving.metrics import IngressMetrics
from mmrag.serving.openai import chat
from mmrag.serving.openai.completions_api import completions_router
from mmrag.serving.openai.edge import EdgeGuard
from mmrag.serving.openai.embeddings_api import embeddings_router
from mmrag.serving.openai.files_api import files_router
from mmrag.serving.openai.observed import observed
from mmrag.serving.openai.playground_api import playground_router
from mmrag.serving.openai.protocol import ChatCompletionRequest, ModelCard, ModelList, now
from mmrag.serving.openai.responses_api import responses_router
from mmrag.serving.openai.streaming import ChunkEvents, StreamThenCall
from mmrag.serving.openai.vector_stores_api import request_owners, vector_stores_router
from mmrag.serving.pipeline import ChatBackend, ChatPipeline
from mmrag.serving.retrieval.lite_server import check_lite_server

logger = logging.getLogger(__name__)


class RequestTimeoutError(OpenAIError):
    status_code = 408
    error_type = "invalid_request_error"


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers)


def create_app(config: MmragConfig, backend: ChatBackend) -> FastAPI:
    app = FastAPI(title="mmrag", version="0.1.0")
    pipeline = ChatPipeline(config, backend)
    owner_of = request_owners(config)  # the key's id: a keyed chat searches only its vector stores
    metrics = IngressMetrics()
    started = now()
    app.add_middleware(EdgeGuard, server=config.server, api_keys=config.server.accepted_api_keys())

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
            await check_lite_server(config.retrieval)  # a loopback connect: the Lite server `mmrag serve` restarts
            await backend.check_health()
        except Exception as exc:
            logger.warning("health check failed: %s", exc)
            # Our own errors say what is wrong in client terms; anything else stays in the log.
            reason = exc.message if isinstance(exc, OpenAIError) else "the engine is not serving"
            return error_response(EngineUnavailableError(f"not ready: {reason}"))
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
        return await observed(metrics, "chat completion", lambda start: _chat(http_request, start))

    async def read_request_body(http_request: Request) -> bytes:
        """The body under this server's limits (size, idle and total read time)."""
        limits = config.limits
        return await read_body(
            http_request,
            limits.max_request_bytes,
            idle_timeout_s=limits.body_idle_timeout_s,
            total_timeout_s=limits.body_read_timeout_s,
            min_bytes_per_s=limits.body_min_bytes_per_s,
        )

    async def _chat(http_request: Request, start: float) -> Response:
        require_json(http_request)
        request = await pipeline.parse_off_loop(await read_request_body(http_request))
        prepared = await pipeline.prepare(request, owner=owner_of(http_request))
        deltas = pipeline.generate(prepared)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            first = await _first_delta(deltas)  # raises before any byte is sent: a clean 4xx
            metrics.ttft.observe(time.perf_counter() - start)
            ids = {"completion_id": prepared.completion_id, "created": now(), "model": request.model}
            events = sse_events(first, deltas, include_usage=include_usage, metrics=metrics, start=start, **ids)
            return StreamThenCall(events, media_type="text/event-stream", on_done=metrics.in_flight.dec)
        completion = await pipeline.complete(prepared, _timed(deltas, start))
        metrics.observe_usage(completion.usage)
        return JSONResponse(completion.model_dump())

    async def _timed(deltas: AsyncIterator[GenerationDelta], start: float) -> AsyncIterator[GenerationDelta]:
        first = True
        async for delta in deltas:
            if first:
                metrics.ttft.observe(time.perf_counter() - start)
                first = False
            yield delta

    app.include_router(files_router(config))
    app.include_router(vector_stores_router(config, chat_backend=backend))
    app.include_router(
        responses_router(config, pipeline, metrics, require_json=require_json, read_body=read_request_body)
    )
    body_rules = {"require_json": require_json, "read_body": read_request_body}
    app.include_router(completions_router(config, pipeline, metrics, **body_rules))
    app.include_router(embeddings_router(config, pipeline, metrics, **body_rules))
    if config.server.playground:
        app.include_router(playground_router())
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


def require_json(http_request: Request) -> None:
    """Bodies are JSON, and say so (as vLLM requires, with a 400): a web page can send ``text/plain`` or a
    form to any server without the browser asking it first, but not ``application/json``."""
    content_type = http_request.headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() != "application/json":
        raise InvalidRequestError(
            f"Content-Type must be application/json, got {clip(content_type) if content_type else 'none'}",
            param="Content-Type",
            code="unsupported_media_type",
        )


async def read_body(
    http_request: Request,
    max_bytes: int,
    *,
    idle_timeout_s: float,
    total_timeout_s: float,
    min_bytes_per_s: float | None = None,
) -> bytes:
    """The body, refused past ``max_bytes`` (413) or when it arrives too slowly (408): a trickle of bytes
    must not hold an ingress slot for the whole request timeout. With ``min_bytes_per_s``, a body that
    declares its length must arrive within ``idle_timeout_s`` + length / rate (at most ``total_timeout_s``).
    A client that hangs up raises ``ClientDisconnect``."""
    declared = http_request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(f"request body larger than {max_bytes} bytes")
    if declared and declared.isdigit() and min_bytes_per_s:
        total_timeout_s = min(total_timeout_s, idle_timeout_s + int(declared) / min_bytes_per_s)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + total_timeout_s
    chunks = aiter(http_request.stream())
    body = bytearray()
    while True:
        left = deadline - loop.time()
        try:
            async with asyncio.timeout(min(idle_timeout_s, left)):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return bytes(body)
        except TimeoutError:
            if left <= idle_timeout_s:
                raise RequestTimeoutError(f"request body not received within {total_timeout_s:.3g} s") from None
            raise RequestTimeoutError(f"no request body data for {idle_timeout_s:g} s") from None
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLargeError(f"request body larger than {max_bytes} bytes")


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
    events = ChunkEvents(lambda delta, opens: chat.chunk_of(delta, first=opens, **ids).model_dump())
    started: set[int] = set()
    last = first
    try:
        if first is not None:
            started.add(first.index)
            yield events.event(first, first=True)
            async for delta in deltas:
                yield events.event(delta, first=delta.index not in started)
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
