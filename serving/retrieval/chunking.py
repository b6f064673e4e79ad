"""Token-aware chunking: windows of the encoder's tokens, cut back to exact substrings of the text.

A chunk holds at most ``chunk_tokens`` encoder tokens (so the encoder embeds all of it), consecutive
chunks share ``overlap_tokens`` tokens, and each chunk's text is the original text between its first
token's start and its last token's end: no detokenization artefacts, whitespace inside kept as written.
A chunk's text is cut to :data:`MAX_CHUNK_BYTES` of UTF-8 (Milvus's text field holds 65,535 bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Longer only when one "token" is a huge unbroken run of characters (the tokenizer makes it one unknown
# token), of which the encoder reads nothing more anyway.
MAX_CHUNK_BYTES = 60_000


@dataclass(frozen=True)
class TextChunk:
    text: str
    index: int
    """Position of the chunk in its document (0-based)."""
    start_char: int
    end_char: int


def chunk_text(
    text: str,
    token_spans: Callable[[str], list[tuple[int, int]]],
    chunk_tokens: int,
    overlap_tokens: int,
) -> list[TextChunk]:
    """Split ``text`` into overlapping token windows; a text with no tokens gives no chunk."""
    if overlap_tokens >= chunk_tokens:
        raise ValueError("overlap_tokens must be smaller than chunk_tokens")
    spans = token_spans(text)
    chunks: list[TextChunk] = []
    stride = chunk_tokens - overlap_tokens
    start = 0
    while start < len(spans):
        window = spans[start : start + chunk_tokens]
        begin, end = window[0][0], window[-1][1]
        chunks.append(TextChunk(bounded_chunk(text[begin:end]), len(chunks), begin, end))
        if start + chunk_tokens >= len(spans):
            break
        start += stride
    return chunks


def bounded_chunk(text: str) -> str:
    """``text`` cut to at most :data:`MAX_CHUNK_BYTES` UTF-8 bytes, on a character boundary."""
    data = text.encode()
    return text if len(data) <= MAX_CHUNK_BYTES else data[:MAX_CHUNK_BYTES].decode("utf-8", errors="ignore")
