"""One batch line through the chat pipeline, in-process: the adapter ``mmrag batch`` runs per line.

The steps are :class:`~mmrag.serving.pipeline.ChatPipeline`'s, as for the HTTP app: the same parsing and
limits, the same image loader, the same retrieval stage and the same engine, so a line gets the answer (or
the error) the server would give. ``stream`` in a body is ignored: a batch answer is always a whole
completion.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from mmrag.serving.batch.records import BatchLine, failure_record, success_record
from mmrag.serving.config import MmragConfig
from mmrag.serving.errors import OpenAIError
from mmrag.serving.openai.protocol import new_completion_id
from mmrag.serving.pipeline import ChatBackend, ChatPipeline, PreparedChat
from mmrag.serving.retrieval.protocol import RetrievalOptions, RetrievalResult

logger = logging.getLogger(__name__)


@dataclass
class PreparedLine:
    """A line ready for the engine (what crosses from the retriever pool to the LLM pool on Ray)."""

    line: BatchLine
    chat: PreparedChat


class BatchChain:
    def __init__(self, config: MmragConfig, backend: ChatBackend):
        self.pipeline = ChatPipeline(config, backend)

    async def answer(self, line: BatchLine) -> dict[str, Any]:
        prepared = await self.prepare(line)
        if isinstance(prepared, dict):
            return prepared
        return await self.generate(prepared)

    async def prepare(self, line: BatchLine) -> PreparedLine | dict[str, Any]:
        """Validation, image loading and retrieval; a failure comes back as the line's output record."""
        try:
            request = self.pipeline.parse(json.dumps(line.body).encode())
            return PreparedLine(line, await self.pipeline.prepare(request))
        except Exception as exc:
            return failure_record(line, new_completion_id(), as_openai_error(exc, line))

    async def generate(self, prepared: PreparedLine) -> dict[str, Any]:
        chat = prepared.chat
        try:
            completion = await self.pipeline.complete(chat)
        except Exception as exc:
            return failure_record(prepared.line, chat.completion_id, as_openai_error(exc, prepared.line))
        return success_record(prepared.line, chat.completion_id, completion.model_dump())


def as_openai_error(exc: Exception, line: BatchLine) -> OpenAIError:
    if isinstance(exc, OpenAIError):
        return exc
    # As in the HTTP handler: an unexpected error is logged here and answered as a bare 500.
    logger.error("line %d: unhandled error", line.line, exc_info=exc)
    return OpenAIError("internal server error")


class LazyRetriever:
    """The retrieval stage, built on the first request that retrieves: a batch without retrieval never
    loads the encoder or opens Milvus (opened in-process, Milvus Lite allows one process per file)."""

    def __init__(self, config: MmragConfig):
        self._config = config
        self._stage: Any = None
        self._lock = asyncio.Lock()

    async def retrieve(self, options: RetrievalOptions | None, query_text: str) -> RetrievalResult:
        async with self._lock:
            if self._stage is None:
                from mmrag.serving.retrieval.stage import RetrievalStage

                self._stage = await asyncio.to_thread(RetrievalStage, self._config)
        return await self._stage.retrieve(options, query_text)
