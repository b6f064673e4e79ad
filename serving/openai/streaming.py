"""What the streaming routes (chat completions, responses) share at the HTTP level."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class StreamThenCall(StreamingResponse):
    """A streaming response that calls ``on_done`` once it has been sent or abandoned (the client hung up,
    the stream failed): a background task would be skipped on a disconnect. The in-flight gauge uses it to
    count a stream until its last byte."""

    def __init__(self, content: AsyncIterator[str], *, on_done: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._on_done = on_done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_done()
