"""What every model route (chat, responses, completions, embeddings) does around its own work: the ingress
metrics, and errors in the OpenAI shape."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from mmrag.serving.errors import OpenAIError
from mmrag.serving.metrics import IngressMetrics
from mmrag.serving.openai.streaming import StreamThenCall

logger = logging.getLogger(__name__)

# nginx's "client closed request", as the chat route answers a client gone before its body was read.
CLIENT_CLOSED_REQUEST = 499


async def observed(metrics: IngressMetrics, route: str, handle: Callable[[float], Awaitable[Response]]) -> Response:
    """``handle(start)``'s response, counted by status; in flight until its last byte (a stream ends later,
    and calls ``metrics.in_flight.dec`` itself: its ``on_done``). ``route`` names it in the log."""
    start = time.perf_counter()
    metrics.in_flight.inc()
    try:
        response = await handle(start)
    except OpenAIError as exc:
        response = JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=exc.headers)
    except ClientDisconnect:
        logger.info("client closed the connection before its %s request body was read", route)
        response = Response(status_code=CLIENT_CLOSED_REQUEST)
    except Exception:
        logger.exception("unhandled error in %s", route)
        response = JSONResponse(OpenAIError("internal server error").to_dict(), status_code=500)
    metrics.requests.labels(status=str(response.status_code)).inc()
    if isinstance(response, StreamThenCall):
        return response
    metrics.in_flight.dec()
    metrics.latency.observe(time.perf_counter() - start)
    return response
