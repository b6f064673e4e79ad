"""What every KV method is: a frozen dataclass of settings and three functions over one layer's prompt.

The vLLM worker and the reference engine call them at the same point (after a decoder layer's prefill
attention, on one sequence) with the same tensors, so a method written once runs in both:

- :meth:`KVMethod.kept_count`: entries each layer and head keeps (the vLLM scheduler frees blocks by it
  before the worker has computed anything, so it depends only on the prompt's layout);
- :meth:`KVMethod.scores`: per-KV-head importance of each entry, or None for rules that need none;
- :meth:`KVMethod.compress`: the kept keys and values (and their source positions).

Method modules import torch and the kernels inside their functions: the registry builds settings in the
HTTP ingress, which never loads torch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    import torch

__all__ = ["ImageBudgetEviction", "KVMethod", "ScoreSource", "attention_scores", "check_score_source", "check_share"]

# Where attention column sums come from: "probs" the eager probabilities (the authors' way), "chunked"
# recomputed from Q and K in row chunks, "triton" the Triton kernel (CUDA or TRITON_INTERPRET=1), "auto"
# the probabilities when the caller has them (the reference engine) and chunked otherwise (vLLM's kernels
# expose none).
ScoreSource = Literal["auto", "probs", "chunked", "triton"]
_SCORE_SOURCES = ("auto", "probs", "chunked", "triton")


def check_share(name: str, value: float | None, *, low_open: bool = True) -> None:
    """A share in (0, 1] (or [0, 1] with ``low_open=False``); None passes."""
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, not {value!r}")
    if not ((value > 0.0) if low_open else (value >= 0.0)) or value > 1.0:
        raise ValueError(f"{name} must be in {'(0' if low_open else '[0'}, 1], got {value}")


@dataclass(frozen=True)
class KVMethod(abc.ABC):
    """A rule that compacts one prompt's KV cache after prefill, layer by layer, every head to one count."""

    name: ClassVar[str]

    @abc.abstractmethod
    def kept_count(self, is_image: torch.Tensor) -> int:
        """Entries every layer and head keeps of a prompt whose image entries are ``is_image`` (``(L,)``)."""

    def scores(
        self, probs: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, scaling: float
    ) -> torch.Tensor | None:
        """``(Hkv, L)`` importance from ``probs`` ``(Hq, L, L)`` (None where no probabilities exist) or
        ``q`` ``(Hq, L, D)`` and ``k`` ``(Hkv, L, D)``; None for rules that do not rank by attention."""
        return None

    @abc.abstractmethod
    def keep_indices(self, scores: torch.Tensor | None, is_image: torch.Tensor, heads: int) -> torch.Tensor:
        """``(heads, kept_count)`` ascending prompt positions each KV head keeps."""

    def compress(
        self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None, is_image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``keys``, ``values``: ``(Hkv, L, D)`` post-RoPE -> the kept ``(Hkv, n, D)`` twice and their
        ``(Hkv, n)`` source positions. The default evicts without merging."""
        from mmrag.kernels.lookm import merge_evicted

        keep_idx = self.keep_indices(scores, is_image, keys.shape[0])
        kept_k, kept_v = merge_evicted(keys, values, keep_idx, None)
        return kept_k, kept_v, keep_idx


def attention_scores(
    source: ScoreSource, chunk_size: int, probs: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``(Hkv, L)`` attention column sums over every prompt query, query heads of one KV group summed
    (a KV head is what gets evicted)."""
    import torch

    from mmrag.kernels.attention_scores import attention_column_sums, sum_query_groups

    if source == "auto":
        source = "chunked" if probs is None else "probs"
    if source == "probs":
        if probs is None:
            raise ValueError("score_from='probs' needs the attention probabilities")
        per_query_head = probs.sum(dim=1, dtype=torch.float32)
    elif source == "chunked":
        per_query_head = attention_column_sums(q, k, scaling, chunk_size)
    elif source == "triton":
        from mmrag.kernels.attention_scores_triton import attention_column_sums_triton

        per_query_head = attention_column_sums_triton(q, k, scaling)
    else:
        raise ValueError(f"unknown score source {source!r}")
    return sum_query_groups(per_query_head, k.shape[0])


@dataclass(frozen=True)
class ImageBudgetEviction(KVMethod):
    """The naive rules' shared budget: every text entry plus ``ceil(image_budget * n_image)`` image entries
    (LOOK-M's ``image_budget``), so each control keeps as many entries as LOOK-M at that budget."""

    image_budget: float = 0.25

    def __post_init__(self) -> None:
        check_share("image_budget", self.image_budget)

    def kept_count(self, is_image: torch.Tensor) -> int:
        from mmrag.kernels.kv_baselines import image_keep_count

        return int((~is_image).sum()) + image_keep_count(int(is_image.sum()), self.image_budget)


def check_score_source(score_from: str, chunk_size: int) -> None:
    if score_from not in _SCORE_SOURCES:
        raise ValueError(f"score_from must be one of {list(_SCORE_SOURCES)}, not {score_from!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
