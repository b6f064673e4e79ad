"""The chat-completions extension for retrieval, and how retrieved chunks enter the prompt.

Request: the ``openai`` client sends ``extra_body={"retrieval": {...}}``, parsed as
:class:`RetrievalOptions`; absent fields take the server's ``retrieval`` configuration.

Response: a top-level ``retrieval`` field holding :class:`RetrievalInfo` (in streaming, on the first
chunk): which documents were retrieved (id, score, source, ``kind``: text or image), how many entered the
prompt, and whether retrieval was degraded and why. Image hits (vector-store image files) are not text
chunks: the pipeline shows them to the model as images, before the last user message's own content
(:func:`insert_retrieved_images`).

Text RAG template (``mode: "text"``), built by :func:`build_text_rag_messages`::

    <instruction>

    [1] (source: <source>)
    <chunk text>

    [2] (source: <source>)
    <chunk text>

placed, per ``retrieval.text_rag.placement``, into the system message (appended to a leading system
message, else a new first message) or before the text of the last user message.

Truncation policy (all counted in the LLM's tokens, within ``budget_tokens``): chunks go in rank order
and whole; the first chunk that does not fit is cut to the remaining budget if at least
``min_partial_tokens`` of its text fit, otherwise dropped; every lower-ranked chunk is dropped. If not
even the instruction fits, no context is inserted. The caller sets the budget to
``min(text_rag.max_context_tokens, max_model_len - prompt_tokens - completion_tokens)``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from mmrag.serving.retrieval.config import RetrievalConfig, RetrievalMode, TextRagConfig
from mmrag.serving.retrieval.errors import RetrievalRequestError, UnsupportedModeError


class RetrievalOptions(BaseModel):
    """The request extension ``"retrieval"``; every field defaults to the server's configuration."""

    model_config = ConfigDict(extra="forbid")

    mode: RetrievalMode | None = Field(
        default=None,
        description="'none': no retrieval; 'text': chunks in the prompt; 'xrag': one projected token per chunk.",
    )
    top_k: int | None = Field(default=None, gt=0, description="Chunks to retrieve (<= retrieval.max_top_k).")
    filter: str | None = Field(
        default=None,
        max_length=4096,
        description='A Milvus boolean expression over source/metadata, e.g. source like "docs/%".',
    )
    collection: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$", description="Collection to search."
    )
    hybrid: bool | None = Field(default=None, description="Dense + BM25 full-text, fused with RRF.")
    vector_store_ids: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="Search these vector stores (/v1/vector_stores) instead of a collection; `mode` defaults "
        "to 'text' then. The response's documents name each hit's file_id and filename.",
    )

    @model_validator(mode="after")
    def _stores_or_collection(self) -> RetrievalOptions:
        if self.vector_store_ids is not None and self.collection is not None:
            raise ValueError("give either collection or vector_store_ids, not both")
        return self

    @field_validator("filter")
    @classmethod
    def _shallow_filter(cls, expression: str | None) -> str | None:
        """Milvus parses filters recursively (Milvus Lite in this very process): a deep one is refused here."""
        if expression is not None and filter_nesting(expression) > MAX_FILTER_NESTING:
            raise ValueError(f"the filter is nested too deeply (at most {MAX_FILTER_NESTING} levels)")
        return expression


# Far beyond any hand-written filter, far below the parsers' recursion limits.
MAX_FILTER_NESTING = 32
_STRING_LITERAL = re.compile(r""""(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'""")
_NESTING_TOKEN = re.compile(r"[()\[\]]|\bnot\b|!(?!=)", re.IGNORECASE)


def filter_nesting(expression: str) -> int:
    """An upper bound on how deep a parser recurses for ``expression``: the deepest bracket nesting plus
    every unary ``not``/``!`` (string literals skipped)."""
    depth = deepest = unary = 0
    for token in _NESTING_TOKEN.findall(_STRING_LITERAL.sub("", expression)):
        if token in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif token in ")]":
            depth = max(0, depth - 1)
        else:
            unary += 1
    return deepest + unary


class ResolvedOptions(BaseModel):
    """Options with every default filled in from the configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: RetrievalMode
    top_k: int
    filter: str | None
    collection: str
    hybrid: bool
    # Set when the request's mode could not be served as asked (xrag without a projector -> text).
    mode_fallback: str | None = None


def resolve_options(options: RetrievalOptions | dict | None, config: RetrievalConfig) -> ResolvedOptions:
    """Fill defaults and check the request against the server's limits (raises 400-type errors)."""
    if not isinstance(options, RetrievalOptions):
        options = RetrievalOptions.model_validate(options or {})
    # Naming vector stores asks for retrieval, even where the server's default is none.
    default_mode = "text" if options.vector_store_ids and config.default_mode == "none" else config.default_mode
    resolved = ResolvedOptions(
        mode=options.mode or default_mode,
        top_k=options.top_k or config.top_k,
        filter=options.filter.strip() if options.filter and options.filter.strip() else None,
        collection=options.collection or config.collection,
        hybrid=config.hybrid if options.hybrid is None else options.hybrid,
    )
    if resolved.mode == "xrag" and config.xrag.projector is None:
        reason = "no xRAG projector is configured for this server's encoder and LLM (retrieval.xrag.projector)"
        if config.xrag.on_unavailable == "error":
            raise UnsupportedModeError(f"retrieval mode 'xrag' is not available: {reason}; use 'text'")
        resolved = resolved.model_copy(update={"mode": "text", "mode_fallback": f"xrag -> text: {reason}"})
    allowed = config.allowed_collections
    if allowed is not None and resolved.collection not in {config.collection, *allowed}:
        raise RetrievalRequestError(
            f"collection {resolved.collection!r} is not served here (retrieval.allowed_collections)",
            field="retrieval.collection",
        )
    if resolved.top_k > config.max_top_k:
        raise RetrievalRequestError(
            f"top_k={resolved.top_k} exceeds this server's limit {config.max_top_k}", field="retrieval.top_k"
        )
    return resolved


class RetrievedChunk(BaseModel):
    """One search hit, with its text (server side: what the prompt is built from)."""

    id: str
    score: float = Field(description="Similarity (COSINE/IP: higher is closer; L2: lower) or RRF score.")
    text: str
    source: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    vector: list[float] | None = Field(default=None, description="xrag mode: the chunk's xRAG-space vector.")


class RetrievedDocument(BaseModel):
    """One hit as the response shows it."""

    id: str
    score: float
    source: str
    file_id: str | None = Field(default=None, description="The file of a vector-store hit (`vector_store_ids`).")
    filename: str | None = Field(default=None, description="That file's name.")
    kind: Literal["text", "image"] = Field(
        default="text", description="'image': an image file, shown to the model as an image (not as text)."
    )
    image_dropped: str | None = Field(
        default=None, description="An image hit that did not enter the prompt: why (model, limits, the file)."
    )


class RetrievalInfo(BaseModel):
    """The response extension ``"retrieval"``."""

    mode: RetrievalMode
    mode_fallback: str | None = Field(default=None, description="Why the requested mode was not used.")
    collection: str | None = None
    hybrid: bool = False
    documents: list[RetrievedDocument] = Field(default_factory=list, description="Best first.")
    context_documents: int = Field(
        default=0, description="How many of the text `documents` entered the prompt (the rest did not fit)."
    )
    context_images: int = Field(
        default=0, description="How many of the image `documents` entered the prompt as images."
    )
    context_truncated: bool = Field(default=False, description="A document was cut or dropped to fit.")
    degraded: bool = Field(default=False, description="Retrieval failed and the answer was made without it.")
    degraded_reason: str | None = None


class RetrievalResult(BaseModel):
    """What :meth:`Retriever.retrieve` returns: the chunks (for the prompt) and the response info."""

    chunks: list[RetrievedChunk] = Field(default_factory=list)
    info: RetrievalInfo
    image_chunks: list[RetrievedChunk] = Field(
        default_factory=list, description="Image hits, moved out of `chunks`: shown as images, not as text."
    )


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer used for budgets (vLLM's ``get_tokenizer()`` has it)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def query_text_from_messages(messages: Sequence[dict[str, Any]], max_chars: int | None = None) -> str:
    """The retrieval query: the text of the last user message (image parts ignored), cut to ``max_chars``."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return bounded_query(_text_of(message.get("content")), max_chars)
    return ""


def bounded_query(query_text: str, max_chars: int | None) -> str:
    """The query's first ``max_chars`` characters (``retrieval.max_query_chars``)."""
    return query_text if max_chars is None else query_text[:max_chars]


def build_text_rag_messages(
    messages: Sequence[dict[str, Any]],
    result: RetrievalResult,
    tokenizer: Tokenizer,
    budget_tokens: int,
    config: TextRagConfig,
) -> list[dict[str, Any]]:
    """A copy of ``messages`` with the retrieved chunks inserted (see the module doc for the policy).

    Also sets ``result.info.context_documents`` and ``result.info.context_truncated``.
    """
    context, used, cut = render_context(result.chunks, tokenizer, budget_tokens, config)
    result.info.context_documents = used
    result.info.context_truncated = cut or used < len(result.chunks)
    if not context:
        return list(messages)
    return _insert(copy.deepcopy(list(messages)), context, config.placement)


def render_context(
    chunks: Sequence[RetrievedChunk], tokenizer: Tokenizer, budget: int, config: TextRagConfig
) -> tuple[str, int, bool]:
    """(context text, chunks used, whether the last used chunk was cut) within ``budget`` tokens."""
    if not chunks or _count(tokenizer, config.instruction) > budget:
        return "", 0, False
    parts = [config.instruction]
    cut = False
    for number, chunk in enumerate(chunks, start=1):
        whole = _render_chunk(config, number, chunk, chunk.text)
        if _count(tokenizer, "\n\n".join([*parts, whole])) <= budget:
            parts.append(whole)
            continue
        partial = _cut_chunk(parts, number, chunk, tokenizer, budget, config)
        if partial is not None:
            parts.append(partial)
            cut = True
        break
    return "\n\n".join(parts), len(parts) - 1, cut


def _cut_chunk(
    parts: list[str], number: int, chunk: RetrievedChunk, tokenizer: Tokenizer, budget: int, config: TextRagConfig
) -> str | None:
    """The chunk's head that fits the rest of the budget, or None if under ``min_partial_tokens``."""
    frame = _count(tokenizer, "\n\n".join([*parts, _render_chunk(config, number, chunk, "")]))
    room = budget - frame
    ids = tokenizer.encode(chunk.text, add_special_tokens=False)
    # Token counts are not additive across a join, so shrink until the whole context really fits.
    while room >= max(config.min_partial_tokens, 1):
        candidate = _render_chunk(config, number, chunk, tokenizer.decode(ids[:room]).rstrip())
        if _count(tokenizer, "\n\n".join([*parts, candidate])) <= budget:
            return candidate
        room -= max(1, room // 16)
    return None


def _render_chunk(config: TextRagConfig, number: int, chunk: RetrievedChunk, text: str) -> str:
    return config.document_template.format(
        number=number, source=chunk.source, text=text, id=chunk.id, score=chunk.score
    )


def _count(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _insert(messages: list[dict[str, Any]], context: str, placement: str) -> list[dict[str, Any]]:
    if placement == "system":
        if messages and messages[0].get("role") in ("system", "developer"):
            messages[0]["content"] = _join_content(messages[0].get("content"), context, context_first=False)
        else:
            messages.insert(0, {"role": "system", "content": context})
        return messages
    for message in reversed(messages):
        if message.get("role") == "user":
            message["content"] = _join_content(message.get("content"), context, context_first=True)
            return messages
    messages.append({"role": "user", "content": context})
    return messages


def _join_content(content: Any, context: str, context_first: bool) -> Any:
    """Add ``context`` to a message content that is a string or a list of parts (images kept)."""
    if isinstance(content, list):
        part = {"type": "text", "text": context + "\n\n" if context_first else "\n\n" + context}
        return [part, *content] if context_first else [*content, part]
    text = content or ""
    if not text:
        return context
    return f"{context}\n\n{text}" if context_first else f"{text}\n\n{context}"


def insert_retrieved_images(
    messages: list[dict[str, Any]], captions: Sequence[str]
) -> tuple[list[dict[str, Any]], int]:
    """``messages`` with one ``caption`` text part and one image part per retrieved image, at the start of
    the last user message (text RAG's context, placed there later, goes before them: documents, images, then
    the question), and the index in the request's image list where those images go (the image parts of
    earlier messages come first). Raises ``ValueError`` when there is no user message."""
    last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"), None)
    if last is None:
        raise ValueError("no user message to show the images in")
    before = sum(
        1
        for message in messages[:last]
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part.get("type") == "image"
    )
    parts = [part for caption in captions for part in ({"type": "text", "text": caption}, {"type": "image"})]
    content = messages[last].get("content")
    own = content if isinstance(content, list) else [{"type": "text", "text": content}] if content else []
    updated = list(messages)
    updated[last] = {**messages[last], "content": [*parts, *own]}
    return updated, before
