"""Text encoders behind one small interface, built by name from a lazily-imported registry.

An :class:`Encoder` turns texts into float32 vectors of a fixed dimension and tells where its tokens
fall in a text (chunking counts in the encoder's tokens, so a chunk never exceeds what it embeds).
Its ``name`` is recorded in each collection it fills: opening that collection with another encoder is
refused rather than returning meaningless neighbours.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from mmrag.serving.retrieval.config import EncoderConfig


class Encoder(ABC):
    """Texts -> ``float32[len(texts), dim]``. Implementations must be thread-safe for ``encode``."""

    name: str
    """Identity recorded in collections: same name + dim means comparable vectors."""
    dim: int
    max_tokens: int
    """Longest input in tokens (special tokens included); longer inputs are truncated."""
    special_tokens: int
    """Tokens the encoder adds around every input (e.g. [CLS] and [SEP])."""

    @abstractmethod
    def encode(self, texts: Sequence[str], *, is_query: bool = False) -> np.ndarray:
        """Embed ``texts``; ``is_query`` selects the query prefix for asymmetric encoders."""

    @abstractmethod
    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character ``(start, end)`` of each token of ``text``, without special tokens or truncation."""


# name -> "module:factory"; the factory takes the EncoderConfig. Only the chosen one is imported.
ENCODERS: dict[str, str] = {
    "minilm": "mmrag.serving.retrieval.encoders.transformers_encoder:bundled_minilm",
    "local": "mmrag.serving.retrieval.encoders.transformers_encoder:from_directory",
}


def load_encoder(config: EncoderConfig) -> Encoder:
    """Build the encoder ``config`` names (``module:factory`` paths work too, for out-of-tree ones)."""
    target = ENCODERS.get(config.name, config.name if ":" in config.name else None)
    if target is None:
        raise ValueError(f"unknown encoder {config.name!r}; known: {sorted(ENCODERS)} or 'module:factory'")
    module_path, _, factory = target.partition(":")
    return getattr(importlib.import_module(module_path), factory)(config)


__all__ = ["ENCODERS", "Encoder", "load_encoder"]
