"""``POST /v1/responses``: OpenAI's Responses API as a thin adapter over the chat pipeline.

A request becomes a chat-completions request (``instructions`` a system message, ``input`` the messages,
``input_image`` parts ``image_url`` parts) and goes through the same :class:`ChatPipeline` as chat: the same
limits, image loading and retrieval. Errors from that path name the chat field; they are renamed to the
Responses field (``messages[2].content[1].image_url.url`` -> ``input[1].content[1].image_url`` after
``instructions``) before they leave.

``file_search`` is chat's ``retrieval.vector_store_ids`` in ``text`` mode: the pipeline searches the named
stores with the last user text and the engine puts the chunks into the prompt as text RAG does. The
response then holds a ``file_search_call`` item (its ``results`` only when ``include`` asks for
``file_search_call.results``) before the ``message``, whose text carries one ``file_citation`` per file
whose chunks entered the prompt (as the engine reports it), best first, each at ``index`` = the end of the
text: the model's own "[1]" markers are not parsed, so no position inside the text is claimed.

Nothing is stored: ``store`` is accepted and ignored, and ``GET /v1/responses/{id}`` is a 404 that says so.
Streams follow OpenAI's event sequence (``response.created`` ... ``response.completed``, each with
``sequence_number``); an error after the stream started is an ``error`` event, and the stream ends.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.protocol import GenerationDelta
from mmrag.serving.errors import InvalidRequestError, NotFoundError, OpenAIError, PayloadTooLargeError
from mmrag.serving.metrics import IngressMetrics
from mmrag.serving.openai import chat
from mmrag.serving.openai import responses_protocol as rp
from mmrag.serving.openai.observed import observed
from mmrag.serving.openai.protocol import ChatCompletionRequest, json_object, validated
from mmrag.serving.openai.streaming import StreamThenCall
from mmrag.serving.openai.vector_stores_api import documented, request_owners
from mmrag.serving.pipeline import INLINE_PARSE_BYTES, ChatPipeline, PreparedChat, reject_lone_surrogates
from mmrag.serving.retrieval.protocol import (
    RetrievalInfo,
    RetrievalResult,
    RetrievedChunk,
    query_text_from_messages,
)
from mmrag.serving.vector_stores.backend import backend_of
from mmrag.serving.vector_stores.filters import FilterError, to_milvus

logger = logging.getLogger(__name__)

# The file_search tool's position in ``tools`` (at most one tool is accepted).
TOOL = "tools[0]"


def responses_router(
    config: MmragConfig,
    pipeline: ChatPipeline,
    metrics: IngressMetrics,
    *,
    require_json: Callable[[Request], None],
    read_body: Callable[[Request], Awaitable[bytes]],
) -> APIRouter:
    """The ``/v1/responses`` routes over the app's pipeline (and the vector stores its backend offers).

    ``require_json`` and ``read_body`` are the app's own body rules (``server.require_json``,
    the body read under ``limits``: JSON only, size and read-time limits), passed in so they stay in one place: the
    server mounts this router, so this module cannot import it.
    """
    vector_stores = backend_of(pipeline.backend)
    owner_of = request_owners(config)
    router = APIRouter(tags=["responses"])

    @router.post("/v1/responses", openapi_extra=documented(rp.ResponsesRequest))
    async def create_response(http_request: Request) -> Response:
        return await observed(metrics, "response", lambda start: _respond(http_request, start))

    @router.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> Response:
        raise NotFoundError(
            "responses are not stored on this server: GET /v1/responses/{id} is not implemented "
            "(store is accepted and ignored)",
            param="response_id",
            code="not_implemented",
        )

    async def _respond(http_request: Request, start: float) -> Response:
        require_json(http_request)
        body = await read_body(http_request)
        if len(body) <= INLINE_PARSE_BYTES:
            request = parse_responses_body(body, config)
        else:
            request = await pipeline.offload.run(parse_responses_body, body, config)
        names = ChatFieldNames(request)
        try:
            chat_req = chat_request(request, retrieval_options(request, vector_stores), config)
            prepared = await pipeline.prepare(chat_req, owner=owner_of(http_request))
            deltas = pipeline.generate(prepared)
            first = await anext(deltas, None)  # raises before any byte is sent: a clean 4xx
            metrics.ttft.observe(time.perf_counter() - start)
            builder = ResponseBuilder(request, prepared, config, first)
            if request.stream:
                events = stream_events(builder, first, deltas, names, metrics, start)
                return StreamThenCall(events, media_type="text/event-stream", on_done=metrics.in_flight.dec)
            async for delta in deltas:
                builder.add(delta)
        except OpenAIError as exc:
            raise names.renamed(exc) from None
        metrics.observe_usage(chat.usage_of(builder.last))
        return JSONResponse(builder.response(done=True))

    return router


def parse_responses_body(body: bytes, config: MmragConfig) -> rp.ResponsesRequest:
    """A body -> a validated request; every refusal a 400 naming the field (as the request spells it)."""
    if len(body) > config.limits.max_request_bytes:
        raise PayloadTooLargeError(f"request body larger than {config.limits.max_request_bytes} bytes")
    payload = json_object(body)
    if b"\\u" in body:  # only an escape can carry a lone surrogate
        reject_lone_surrogates(payload)
    rp.check_items(payload, config.limits)
    # The item and part type tags pydantic puts in a location are not fields of the request.
    return validated(rp.ResponsesRequest, payload, not_fields=rp.TAGS)


def retrieval_options(request: rp.ResponsesRequest, vector_stores: Any) -> dict[str, Any]:
    """Chat's ``retrieval`` for this request: the file_search stores in text mode, else no retrieval at all
    (the server's default collection is chat's; a response searches only what its tool names)."""
    tool = request.file_search
    if tool is None:
        return {"mode": "none"}
    if vector_stores is None:  # no retriever behind this app: permanent, as vector stores' own routes say
        raise NotFoundError(
            "vector stores are not enabled on this server (no retriever stage)",
            param=f"{TOOL}.vector_store_ids",
            code="vector_stores_disabled",
        )
    options: dict[str, Any] = {"mode": "text", "vector_store_ids": tool.vector_store_ids}
    if tool.max_num_results is not None:
        options["top_k"] = tool.max_num_results
    if tool.filters is not None:
        try:
            options["filter"] = to_milvus(tool.filters)
        except FilterError as exc:
            raise InvalidRequestError(f"{TOOL}.{exc}", param=f"{TOOL}.filters", code="invalid_filter") from exc
    return options


def chat_request(request: rp.ResponsesRequest, retrieval: dict[str, Any], config: MmragConfig) -> ChatCompletionRequest:
    """The chat request the pipeline serves (its validation errors name chat fields; the caller renames)."""
    return validated(ChatCompletionRequest, rp.chat_payload(request, retrieval), config.limits)


class ChatFieldNames:
    """Renames the chat fields an error names to the Responses request's own."""

    _MESSAGE = re.compile(r"^messages\[(\d+)\](.*)$")

    def __init__(self, request: rp.ResponsesRequest):
        self.offset = 1 if request.instructions is not None else 0
        self.string_input = isinstance(request.input, str)
        self.positions = [i for i, _ in rp.input_messages(request)]  # chat message -> input item

    def name(self, param: str) -> str:
        match = self._MESSAGE.match(param)
        if match:
            index = int(match[1]) - self.offset
            if index < 0:
                return "instructions"
            if self.string_input or index >= len(self.positions):
                return "input"
            return f"input[{self.positions[index]}]{match[2].replace('.image_url.url', '.image_url')}"
        renames = {
            "messages": "input",
            "max_tokens": "max_output_tokens",
            "max_completion_tokens": "max_output_tokens",
            "retrieval.vector_store_ids": f"{TOOL}.vector_store_ids",
            "retrieval.top_k": f"{TOOL}.max_num_results",
            "retrieval.filter": f"{TOOL}.filters",
            "retrieval": TOOL,
        }
        return renames.get(param, param)

    def renamed(self, exc: OpenAIError) -> OpenAIError:
        if exc.param:
            new = self.name(exc.param)
            if new != exc.param:
                if exc.message.startswith(exc.param):  # "messages[1].content[0].image_url.url: ..."
                    exc.message = new + exc.message[len(exc.param) :]
                exc.param = new
        return exc


def ranked_chunks(retrieval: RetrievalResult | None) -> list[RetrievedChunk]:
    """Every hit, text chunks and image hits (moved out of the text chunks), in the search's order."""
    if retrieval is None:
        return []
    rank = {document.id: i for i, document in enumerate(retrieval.info.documents)}
    return sorted([*retrieval.chunks, *retrieval.image_chunks], key=lambda chunk: rank.get(chunk.id, len(rank)))


class ResponseBuilder:
    """The response's output items, filled from the prepared chat and the engine's deltas."""

    def __init__(
        self, request: rp.ResponsesRequest, prepared: PreparedChat, config: MmragConfig, first: GenerationDelta | None
    ):
        self.request = request
        self.prepared = prepared
        self.id = rp.new_response_id()
        self.created_at = int(rp.now())
        self.message_id = rp.new_item_id("msg")
        self.text = ""
        self.finish_reason: str | None = None
        self.last: GenerationDelta | None = None
        retrieval = prepared.generation.retrieval
        # The engine's info says how many chunks entered the prompt (a Serve engine's copy is the only one).
        self.retrieval_info: RetrievalInfo | None = (first.retrieval if first is not None else None) or (
            retrieval.info if retrieval is not None else None
        )
        self.file_search: dict[str, Any] | None = None
        if request.file_search is not None:
            self.file_search = self._file_search_call(prepared, config)
        if first is not None:
            self.add(first)

    def _file_search_call(self, prepared: PreparedChat, config: MmragConfig) -> dict[str, Any]:
        query = query_text_from_messages(prepared.generation.messages, config.retrieval.max_query_chars)
        retrieval = prepared.generation.retrieval
        degraded = self.retrieval_info is not None and self.retrieval_info.degraded
        results = None
        if self.request.include_results:
            results = [
                rp.FileSearchResult(
                    file_id=chunk.metadata.get("file_id"),
                    filename=chunk.metadata.get("filename", chunk.source),
                    score=chunk.score,
                    text=chunk.text,
                    attributes=chunk.metadata.get("attributes") or {},
                )
                for chunk in ranked_chunks(retrieval)
            ]
        call = rp.FileSearchCall(
            id=rp.new_item_id("fs"),
            status="failed" if degraded else "completed",
            queries=[query] if query.strip() else [],
            results=results,
        )
        return call.model_dump()

    def add(self, delta: GenerationDelta) -> None:
        if delta.index == 0:  # n is 1 here; a Responses request has no n
            self.text += delta.text
            self.finish_reason = delta.finish_reason or self.finish_reason
        self.last = delta

    @property
    def incomplete(self) -> bool:
        return self.finish_reason == "length"

    def citations(self) -> list[dict[str, Any]]:
        """One file_citation per file whose chunks (or image) entered the prompt, best first, at the end of the
        text."""
        info = self.retrieval_info
        if self.file_search is None or info is None:
            return []
        texts = [d for d in info.documents if d.kind == "text"]
        fitted = {d.id for d in texts[: info.context_documents]}  # the text documents that fit, best first
        files: dict[str, str] = {}
        for document in info.documents:
            shown = document.id in fitted if document.kind == "text" else document.image_dropped is None
            if shown and document.file_id and document.file_id not in files:
                files[document.file_id] = document.filename or document.source
        index = len(self.text)
        return [
            rp.FileCitation(file_id=file_id, filename=filename, index=index).model_dump()
            for file_id, filename in files.items()
        ]

    def text_part(self, done: bool) -> dict[str, Any]:
        if not done:
            return rp.OutputTextPart(text="").model_dump()
        return rp.OutputTextPart(text=self.text, annotations=self.citations()).model_dump()

    def message(self, done: bool) -> dict[str, Any]:
        status = ("incomplete" if self.incomplete else "completed") if done else "in_progress"
        content = [self.text_part(done)] if done else []
        return {"id": self.message_id, "type": "message", "role": "assistant", "status": status, "content": content}

    def usage(self) -> dict[str, Any]:
        counts = chat.usage_of(self.last)
        usage = rp.ResponseUsage(
            input_tokens=counts.prompt_tokens,
            output_tokens=counts.completion_tokens,
            total_tokens=counts.total_tokens,
            mmrag=counts.mmrag,
        )
        return usage.model_dump(exclude_none=True)

    def response(self, done: bool) -> dict[str, Any]:
        """The response object: in progress (no output yet) or done (whole)."""
        request = self.request
        output = []
        if done:
            output = [*([self.file_search] if self.file_search else []), self.message(done=True)]
        status = ("incomplete" if self.incomplete else "completed") if done else "in_progress"
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools or ()]
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(rp.now()) if done and not self.incomplete else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if done and self.incomplete else None,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "model": request.model,
            "output": output,
            "parallel_tool_calls": request.parallel_tool_calls if request.parallel_tool_calls is not None else True,
            "previous_response_id": None,
            "reasoning": None,
            "store": False,  # nothing is kept, whatever was asked
            "temperature": request.temperature if request.temperature is not None else 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": request.tool_choice or "auto",
            "tools": tools,
            "top_p": request.top_p if request.top_p is not None else 1.0,
            "truncation": "disabled",
            "usage": self.usage() if done else None,
            "user": request.user,
            "metadata": request.metadata or {},
        }


class EventWriter:
    """SSE events in OpenAI's Responses form: ``event: <type>`` and the JSON with its ``sequence_number``."""

    def __init__(self) -> None:
        self._numbers = itertools.count()

    def __call__(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": next(self._numbers), **fields}
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"


def opening_events(builder: ResponseBuilder, event: EventWriter) -> Iterator[str]:
    """Everything before the first text delta: the response, the file_search call, the message's start."""
    yield event("response.created", response=builder.response(done=False))
    yield event("response.in_progress", response=builder.response(done=False))
    output_index = 0
    if builder.file_search is not None:
        # The search ran before the stream opened (a bad store is a clean 404, not a broken stream).
        call = builder.file_search
        item = {**call, "status": "in_progress", "results": None}
        ids = {"output_index": output_index, "item_id": call["id"]}
        yield event("response.output_item.added", output_index=output_index, item=item)
        yield event("response.file_search_call.in_progress", **ids)
        yield event("response.file_search_call.searching", **ids)
        yield event("response.file_search_call.completed", **ids)
        yield event("response.output_item.done", output_index=output_index, item=call)
        output_index += 1
    yield event("response.output_item.added", output_index=output_index, item=builder.message(done=False))
    yield event("response.content_part.added", **_text_ids(builder, output_index), part=builder.text_part(done=False))


def closing_events(builder: ResponseBuilder, event: EventWriter) -> Iterator[str]:
    output_index = 1 if builder.file_search is not None else 0
    ids = _text_ids(builder, output_index)
    for number, citation in enumerate(builder.citations()):
        yield event("response.output_text.annotation.added", **ids, annotation_index=number, annotation=citation)
    yield event("response.output_text.done", **ids, text=builder.text, logprobs=[])
    yield event("response.content_part.done", **ids, part=builder.text_part(done=True))
    yield event("response.output_item.done", output_index=output_index, item=builder.message(done=True))
    final = "response.incomplete" if builder.incomplete else "response.completed"
    yield event(final, response=builder.response(done=True))


def _text_ids(builder: ResponseBuilder, output_index: int) -> dict[str, Any]:
    return {"item_id": builder.message_id, "output_index": output_index, "content_index": 0}


async def stream_events(
    builder: ResponseBuilder,
    first: GenerationDelta | None,
    deltas: AsyncIterator[GenerationDelta],
    names: ChatFieldNames,
    metrics: IngressMetrics,
    start: float,
) -> AsyncIterator[str]:
    event = EventWriter()
    output_index = 1 if builder.file_search is not None else 0
    try:
        for text in opening_events(builder, event):
            yield text
        if first is not None and first.text:
            yield event("response.output_text.delta", **_text_ids(builder, output_index), delta=first.text, logprobs=[])
        async for delta in deltas:
            builder.add(delta)
            if delta.text:
                ids = _text_ids(builder, output_index)
                yield event("response.output_text.delta", **ids, delta=delta.text, logprobs=[])
        for text in closing_events(builder, event):
            yield text
    except OpenAIError as exc:
        exc = names.renamed(exc)
        yield event("error", code=exc.code or exc.error_type, message=exc.message, param=exc.param)
    except Exception:
        logger.exception("error while streaming a response")
        yield event("error", code="internal_error", message="internal server error", param=None)
    finally:
        if builder.last is not None:
            metrics.observe_usage(chat.usage_of(builder.last))
        metrics.latency.observe(time.perf_counter() - start)
