"""One batch line through the server's chain, in-process: validation, images, retrieval, engine.

The steps are the HTTP handler's (``serving/openai/server.py``) minus HTTP: the same parsing and limits,
the same image loader, the same retrieval stage and the same engine, so a line gets the answer (or the
error) the server would give. ``stream`` in a body is ignored: a batch answer is always a whole completion.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from mmrag.serving.batch.records import BatchLine, failure_record, success_record
from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.protocol import GenerationRequest
from mmrag.serving.openai import chat
from mmrag.serving.openai.errors import OpenAIError, PayloadTooLargeError
from mmrag.serving.openai.protocol import ChatCompletionRequest, new_completion_id, now
from mmrag.serving.openai.server import ChatBackend, parse_chat_request, retrieve_for
from mmrag.serving.retrieval.protocol import RetrievalOptions, RetrievalResult

logger = logging.getLogger(__name__)


@dataclass
class PreparedLine:
    """A line ready for the engine (what crosses from the retriever pool to the LLM pool on Ray)."""

    line: BatchLine
    request_id: str
    request: ChatCompletionRequest
    generation: GenerationRequest


class BatchChain:
    def __init__(self, config: MmragConfig, backend: ChatBackend):
        self.config = config
        self.backend = backend

    async def answer(self, line: BatchLine) -> dict[str, Any]:
        prepared = await self.prepare(line)
        if isinstance(prepared, dict):
            return prepared
        return await self.generate(prepared)

    async def prepare(self, line: BatchLine) -> PreparedLine | dict[str, Any]:
        """Validation, image loading and retrieval; a failure comes back as the line's output record."""
        request_id = new_completion_id()
        try:
            body = json.dumps(line.body).encode()
            if len(body) > self.config.limits.max_request_bytes:  # the server's HTTP body cap
                raise PayloadTooLargeError(f"request body larger than {self.config.limits.max_request_bytes} bytes")
            request = parse_chat_request(body)
            generation = await chat.prepare_generation(request, self.config, request_id=request_id)
            generation.retrieval = await retrieve_for(request, generation, self.config, self.backend)
        except Exception as exc:
            return failure_record(line, request_id, as_openai_error(exc, line))
        return PreparedLine(line, request_id, request, generation)

    async def generate(self, prepared: PreparedLine) -> dict[str, Any]:
        request = prepared.request
        try:
            completion = await chat.collect_completion(
                self.backend.generate(prepared.generation),
                n=request.n,
                completion_id=prepared.request_id,
                created=now(),
                model=request.model,
            )
        except Exception as exc:
            return failure_record(prepared.line, prepared.request_id, as_openai_error(exc, prepared.line))
        return success_record(prepared.line, prepared.request_id, completion.model_dump())


def as_openai_error(exc: Exception, line: BatchLine) -> OpenAIError:
    if isinstance(exc, OpenAIError):
        return exc
    # As in the HTTP handler: an unexpected error is logged here and answered as a bare 500.
    logger.error("line %d: unhandled error", line.line, exc_info=exc)
    return OpenAIError("internal server error")


class LazyRetriever:
    """The retriever stage, built on the first request that retrieves: a batch without retrieval never
    loads the encoder or opens Milvus (Milvus Lite allows one process per file)."""

    def __init__(self, config: MmragConfig):
        self._config = config
        self._retriever: Any = None
        self._lock = asyncio.Lock()

    async def retrieve(self, options: RetrievalOptions | None, query_text: str) -> RetrievalResult:
        async with self._lock:
            if self._retriever is None:
                from mmrag.deployments.retriever import Retriever

                self._retriever = await asyncio.to_thread(Retriever, self._config)
        return await self._retriever.retrieve(options, query_text)
