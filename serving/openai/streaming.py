"""What the streaming routes (chat completions, responses) share at the HTTP level."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from mmrag.serving.engine.protocol import GenerationDelta


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


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as compact JSON."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


# Stands in for a delta's text while a chunk's template is built; private-use characters, which JSON
# escapes, so the marker's encoding cannot occur in the template by accident.
_TEXT_MARKER = "\ue000mmrag-delta-text\ue001"
_ENCODED_MARKER = json.dumps(_TEXT_MARKER)
# Shapes of chunk kept per stream: one per choice and role header in practice; a bound for odd streams.
_MAX_TEMPLATES = 64


class ChunkEvents:
    """A stream's deltas as SSE events, each built by ``render`` (delta, first) -> chunk dict, which stays the
    only definition of a chunk.

    Building and dumping a pydantic chunk for every token cost the ingress more per token than the rest of
    its work (the stream's chunks differ only in their text). So the first delta of each shape (its fields
    other than the text and the token counts, and whether it opens its choice) is rendered with a marker for
    its text, and the event is split around the marker's JSON; the stream's later deltas of that shape are the
    two halves around their own JSON-escaped text, byte for byte what ``render`` gives. Deltas that carry
    retrieval info or log-probabilities (rare or different every time) are rendered in full, as is any shape
    whose rendering does not hold the text exactly once as it was given.
    """

    def __init__(self, render: Callable[[GenerationDelta, bool], dict[str, Any]]):
        self._render = render
        self._templates: dict[Any, tuple[str, str] | None] = {}

    def event(self, delta: GenerationDelta, *, first: bool) -> str:
        if delta.retrieval is not None or delta.logprobs is not None:
            return sse(self._render(delta, first))
        shape = dataclasses.replace(delta, text="", prompt_tokens=0, completion_tokens=0, compression=None)
        key = (shape, first)
        try:
            template = self._templates[key]
        except KeyError:
            template = self._template(shape, first) if len(self._templates) < _MAX_TEMPLATES else None
            self._templates[key] = template
        except TypeError:  # a field that cannot be hashed: no template for it
            template = None
        if template is None:
            return sse(self._render(delta, first))
        return template[0] + json.dumps(delta.text) + template[1]

    def _template(self, shape: GenerationDelta, first: bool) -> tuple[str, str] | None:
        event = sse(self._render(dataclasses.replace(shape, text=_TEXT_MARKER), first))
        before, marker, after = event.partition(_ENCODED_MARKER)
        if not marker or _ENCODED_MARKER in after:
            return None
        return before, after
