"""Tasks as chat messages: the OpenAI form a client sends, and the template form the engines render.

The knowledge family's documents go where the server's text RAG puts retrieved chunks (a system message,
``retrieval.text_rag``'s instruction and document template), so a model trained on these prompts reads
real retrieved context the same way.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from mmrag.serving.retrieval.config import TextRagConfig
from mmrag.training.tasks.families import Task

__all__ = ["context_text", "openai_messages", "png_data_url", "template_messages"]


def png_data_url(pixels: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def context_text(documents: tuple[str, ...], sources: tuple[str, ...] = (), config: TextRagConfig | None = None) -> str:
    """The documents as text RAG inserts them (whole; the task generator keeps them within budget).

    ``sources``: one per document; without them, ``kb/<n>``.
    """
    config = config or TextRagConfig()
    sources = sources or tuple(f"kb/{i}" for i in range(1, len(documents) + 1))
    rendered = [
        config.document_template.format(number=i, source=source, text=text, id=str(i), score=0.0)
        for i, (text, source) in enumerate(zip(documents, sources, strict=True), start=1)
    ]
    return "\n\n".join([config.instruction, *rendered])


def _messages(task: Task, image_part, with_documents: bool, layout: TextRagConfig | None) -> list[dict[str, Any]]:
    content = [image_part(task.images[p]) if isinstance(p, int) else {"type": "text", "text": p} for p in task.parts]
    messages: list[dict[str, Any]] = []
    if with_documents and task.documents:
        messages.append({"role": "system", "content": context_text(task.documents, task.sources, layout)})
    messages.append({"role": "user", "content": content})
    return messages


def openai_messages(task: Task, with_documents: bool = True) -> list[dict[str, Any]]:
    """What an ``openai`` client sends: images as PNG data URLs."""
    return _messages(
        task, lambda px: {"type": "image_url", "image_url": {"url": png_data_url(px)}}, with_documents, None
    )


def template_messages(
    task: Task, with_documents: bool = True, layout: TextRagConfig | None = None
) -> list[dict[str, Any]]:
    """What a chat template takes: ``{"type": "image"}`` parts, in the order of ``task.images``.

    ``layout``: how the documents are rendered (None: text RAG's default; an xRAG projector's card may name
    a leaner one, see :func:`mmrag.serving.xrag.projector.ProjectorCard.layout`).
    """
    return _messages(task, lambda px: {"type": "image"}, with_documents, layout)
