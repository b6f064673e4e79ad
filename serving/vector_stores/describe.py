"""The served model's own description of an image file, asked for while the file is indexed.

Ingestion runs in a worker thread of the vector-store service (``service.py``); the model runs elsewhere: the
LLM deployment, reached through a Serve handle (``deployments/retriever.py``), or an engine in this process
(``LocalBackend(engine, stage)``: tests, single-process servers). Both are async and belong to an event loop
(a handle routes on the loop that calls it, vLLM's ``AsyncLLM`` lives on its own), so the worker thread does
not call them: it hands the generation to that loop (:meth:`ImageDescriber.bind`, the loop of the Vector
Stores API calls) and waits at most ``timeout_s``, then cancels it (the engine aborts the request).

The request is a chat of one user message, "Image 1:", the image and one question, greedy and at most
``max_tokens`` per question: the form the default model's vision projector was trained on, and harmless to
any other model. A failure of any kind (no loop yet, a text-only model, the LLM at capacity or restarting,
a timeout, an empty answer) returns None and logs why; the caller indexes the image without it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from mmrag.serving.engine.protocol import GenerationDelta, GenerationRequest, SamplingOptions
from mmrag.serving.models.registry import model_reads_images
from mmrag.serving.vector_stores.config import ImageDescriptionsConfig

logger = logging.getLogger(__name__)

Generate = Callable[[GenerationRequest], AsyncIterator[GenerationDelta]]
"""An engine's ``generate`` (or a Serve handle's stream of it): deltas of one request."""

MAX_DESCRIPTION_CHARS = 1000  # per answer: max_tokens bounds it already, a token may be long


class ImageDescriber:
    """Describes images with ``generate`` on the loop it is bound to; thread-safe, blocking."""

    def __init__(self, config: ImageDescriptionsConfig, generate: Generate, questions: tuple[str, ...]) -> None:
        self.config = config
        self.questions = questions
        self._generate = generate
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run generations on ``loop`` (the one ``generate`` belongs to): the loop of the latest Vector Stores
        call, which is alive (a replica has one; an app in tests may be started again on a new one)."""
        self._loop = loop

    def describe(self, image: Any, filename: str) -> str | None:
        """The model's description of ``image`` (a PIL image), or None (logged why). Blocking: call it from a
        worker thread, never from the bound loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            logger.warning(
                "image %s indexed without the model's description: no event loop runs the model here yet", filename
            )
            return None
        future = asyncio.run_coroutine_threadsafe(self._answers(_bounded(image, self.config.max_side_px)), loop)
        try:
            answers = future.result(timeout=self.config.timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()  # the task is cancelled on its loop, and with it the engine's request
            logger.warning(
                "image %s indexed without the model's description: no answer within %g s "
                "(vector_stores.image_descriptions.timeout_s)",
                filename,
                self.config.timeout_s,
            )
            return None
        except Exception as exc:  # the model's failure, never the file's
            logger.warning(
                "image %s indexed without the model's description: %s: %s", filename, type(exc).__name__, exc
            )
            return None
        description = " ".join(dict.fromkeys(a for a in answers if a))  # "red circle" from "red", "circle"
        if not description:
            logger.warning("image %s indexed without the model's description: the model answered nothing", filename)
            return None
        logger.info("image %s described by the model: %s", filename, description)
        return description

    async def _answers(self, image: Any) -> list[str]:
        return [await self._answer(image, question) for question in self.questions]

    async def _answer(self, image: Any, question: str) -> str:
        request = GenerationRequest(
            request_id=f"describe-{uuid.uuid4().hex}",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Image 1:"},
                        {"type": "image"},
                        {"type": "text", "text": question},
                    ],
                }
            ],
            images=[image],
            sampling=SamplingOptions(max_tokens=self.config.max_tokens, temperature=0.0),
        )
        pieces: list[str] = []
        async for delta in self._generate(request):
            if delta.index == 0:
                pieces.append(delta.text)
        return clean_answer("".join(pieces))


def clean_answer(text: str) -> str:
    """One line, no surrounding punctuation or blanks, bounded: what goes into the indexed text."""
    text = _SPACE.sub(" ", text).strip().strip(".,;:").strip()
    return text[:MAX_DESCRIPTION_CHARS]


_SPACE = re.compile(r"\s+")


def _bounded(image: Any, max_side: int) -> Any:
    """An RGB copy no larger than ``max_side`` on a side (what the model is sent)."""
    image = image.convert("RGB")  # a copy, also for an RGB image: the parsed original is left as it was
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    return image


def describer_for(config: Any, generate: Generate | None) -> ImageDescriber | None:
    """The describer of a server of ``config`` (an ``MmragConfig``) whose model ``generate`` runs, or None
    (logged why) when descriptions are off, nothing runs the model here, or the model reads text only."""
    settings = config.vector_stores.image_descriptions
    if not settings.enabled:
        return None
    if generate is None:
        logger.info("image files are indexed without the model's description: no model runs in this process")
        return None
    if not model_reads_images(config.model.name, config.model.path):
        logger.info(
            "image files are indexed without the model's description: the served model (%s) reads text only",
            config.model.served_name,
        )
        return None
    return ImageDescriber(settings, generate, settings.resolved_questions(config.model.name))
