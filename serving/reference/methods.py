"""The three compression steps the reference engine can apply, one frozen dataclass each.

Each holds its hyper-parameters (defaults: the authors' settings) and one method that the engine calls
at a fixed point of the prefill; the tensor work lives in :mod:`mmrag.kernels`.

- :class:`AIMMerge`, AIM stage (a): before the LLM, on each image's projected visual tokens.
- :class:`AIMPrune`, AIM stage (b): after each decoder layer's attention, which keys the next layers see.
- :class:`LookM`: after each decoder layer's attention, which prompt KV entries the cache keeps.
- :class:`KVBaseline`: the same seam with a naive rule (random, recent window, scores without the text
  prior), the controls LOOK-M is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mmrag.kernels.aim import AIMSchedule, pagerank_importance, select_live_tokens
from mmrag.kernels.attention_scores import attention_column_sums, sum_query_groups
from mmrag.kernels.kv_baselines import (
    image_keep_count,
    random_image_keep_indices,
    recent_keep_indices,
    score_keep_indices,
)
from mmrag.kernels.lookm import LookMBudget, MergeStrategy, merge_evicted, text_prior_keep_indices
from mmrag.kernels.token_merge import MergeResult, merge_tokens, merged_token_count

__all__ = ["AIMMerge", "AIMPrune", "KVBaseline", "LookM"]


@dataclass(frozen=True)
class AIMMerge:
    """AIM stage (a): bipartite merging of each image's visual tokens before the LLM.

    Attributes:
        num_passes: passes of ``r = T // 2`` merges (AIM, LLaVA-OneVision: 2, i.e. 25% of the tokens).
        weighted: ``False`` AIM's unweighted mean; ``True`` ToMe's size-weighted mean.
        positions: ``"contiguous"``: merged tokens take consecutive positions, as in AIM, and the text after
            the image moves closer; ``"spread"``: they are spread over the image's original span and the text
            keeps its positions (:func:`~mmrag.kernels.token_merge.spread_positions`). The cache shrinks alike.

    The metric is the projected features themselves (AIM's LLaVA-OneVision path; its LLaVA-1.5 path
    compares CLIP layer-23 keys instead).
    """

    num_passes: int = 2
    weighted: bool = False
    positions: Literal["contiguous", "spread"] = "contiguous"

    def __post_init__(self) -> None:
        if self.positions not in ("contiguous", "spread"):
            raise ValueError(f"positions must be 'contiguous' or 'spread', not {self.positions!r}")

    def tokens_per_image(self, num_tokens: int) -> int:
        return merged_token_count(num_tokens, self.num_passes)

    def apply(self, features: torch.Tensor) -> MergeResult:
        """``features``: ``(num_images, T, C)`` -> tokens ``(num_images, tokens_per_image(T), C)``."""
        return merge_tokens(features, self.num_passes, weighted=self.weighted)


@dataclass(frozen=True)
class AIMPrune:
    """AIM stage (b): PageRank-ranked pruning of visual keys, layer by layer, during prefill.

    Attributes:
        start_layer, end_layer: the retention schedule (:class:`mmrag.kernels.aim.AIMSchedule`).
        temperature: PageRank softmax temperature (0.1).
        iterations: PageRank power iterations (5).
    """

    start_layer: int = 13
    end_layer: int = 20
    temperature: float = 0.1
    iterations: int = 5

    @property
    def schedule(self) -> AIMSchedule:
        return AIMSchedule(self.start_layer, self.end_layer)

    def next_live(self, layer: int, logits: torch.Tensor, is_text: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """Live keys for the layers after ``layer``.

        Args:
            logits: ``(Hq, L, L)`` this layer's attention logits, masks added.
            is_text: ``(L,)`` bool. live: ``(L,)`` bool, keys live in this layer.
        """
        keep = self.schedule.keep_count(layer, live.numel(), int(is_text.sum()))
        if keep >= live.numel():
            # The authors compute the importance here too, but a full keep makes it unused.
            return live
        importance = pagerank_importance(logits, self.temperature, self.iterations)
        return select_live_tokens(importance, is_text, live, keep)


ScoreSource = Literal["probs", "chunked", "triton"]


@dataclass(frozen=True)
class LookM:
    """LOOK-M: text-prior eviction of image KV entries after prefill, with merge compensation.

    Attributes:
        heavy_ratio: share of the prompt kept by score outside the window (0.1); text is kept beyond it.
        recent_ratio: share of the prompt kept as a recent window (0.1).
        merge: ``"pivotal"`` (the authors' default), ``"averaged"``, ``"weighted"``, or ``None`` (evict
            only: the text-prior H2O baseline).
        score_from: where the column sums come from: ``"probs"`` the eager probabilities (the authors'
            way), ``"chunked"`` recomputed from Q and K in row chunks (:mod:`mmrag.kernels.attention_scores`),
            ``"triton"`` the Triton kernel (needs CUDA or ``TRITON_INTERPRET=1``).
        chunk_size: query rows per chunk for ``"chunked"``.
        image_budget: if set, the budget is a share of the *image* entries instead of the two ratios:
            every text entry plus ``ceil(image_budget * n_image)`` image entries by score (no separate
            window). The accuracy benchmark uses it: with short text-heavy prompts, ratios of the whole
            prompt leave no image entry at all, which measures nothing.
    """

    heavy_ratio: float = 0.1
    recent_ratio: float = 0.1
    merge: MergeStrategy | None = "pivotal"
    score_from: ScoreSource = "probs"
    chunk_size: int = 256
    image_budget: float | None = None

    def scores(self, probs: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
        """``(Hkv, L)`` column sums, from ``probs`` ``(Hq, L, L)`` or ``q`` ``(Hq, L, D)`` + ``k`` ``(Hkv, L, D)``.

        ``probs`` is None where no probabilities exist (vLLM's kernels); ``score_from`` must then not be
        ``"probs"``.

        Query heads of one KV group are summed: a KV head is what gets evicted.
        """
        if self.score_from == "probs":
            if probs is None:
                raise ValueError("LookM(score_from='probs') needs the attention probabilities")
            per_query_head = probs.sum(dim=1, dtype=torch.float32)
        elif self.score_from == "chunked":
            per_query_head = attention_column_sums(q, k, scaling, self.chunk_size)
        elif self.score_from == "triton":
            from mmrag.kernels.attention_scores_triton import attention_column_sums_triton

            per_query_head = attention_column_sums_triton(q, k, scaling)
        else:
            raise ValueError(f"unknown score source {self.score_from!r}")
        return sum_query_groups(per_query_head, k.shape[0])

    def budget(self, is_image: torch.Tensor) -> LookMBudget:
        """The budget for a prompt whose image entries are ``is_image`` (``(L,)`` bool)."""
        if self.image_budget is None:
            return LookMBudget.from_ratios(is_image.numel(), self.heavy_ratio, self.recent_ratio)
        kept_images = image_keep_count(int(is_image.sum()), self.image_budget)
        return LookMBudget(heavy=int((~is_image).sum()) + kept_images, recent=0)

    def kept_count(self, is_image: torch.Tensor) -> int:
        """Entries every layer and head keeps of such a prompt: what :meth:`compress` returns."""
        budget, seq_len = self.budget(is_image), is_image.numel()
        return budget.kept_count(seq_len, int((~is_image[: seq_len - budget.recent]).sum()))

    def compress(
        self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, is_image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compact one layer's prompt KV.

        Args:
            keys, values: ``(Hkv, L, D)`` post-RoPE. scores: ``(Hkv, L)``. is_image: ``(L,)`` bool.

        Returns:
            ``(keys, values, positions)``: ``(Hkv, n_keep, D)`` twice and ``(Hkv, n_keep)`` the logical
            positions the kept entries came from.
        """
        keep_idx = text_prior_keep_indices(scores, is_image, self.budget(is_image))
        kept_k, kept_v = merge_evicted(keys, values, keep_idx, self.merge)
        return kept_k, kept_v, keep_idx


BaselineRule = Literal["random", "recent", "scores"]


@dataclass(frozen=True)
class KVBaseline:
    """Naive eviction at LOOK-M's image budget (same entries kept per head), evict-only.

    Attributes:
        rule: ``"random"`` text + random image entries, ``"recent"`` the last entries, ``"scores"`` top
            entries by attention column sum with text unprotected (:mod:`mmrag.kernels.kv_baselines`).
        image_budget: kept entries = text entries + ``ceil(image_budget * n_image)``, as in :class:`LookM`.
        seed: the random rule's generator seed (every layer draws from a fresh generator: same choice).
    """

    rule: BaselineRule
    image_budget: float
    seed: int = 0

    def scores(self, probs: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
        return sum_query_groups(probs.sum(dim=1, dtype=torch.float32), k.shape[0])

    def compress(
        self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, is_image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heads, seq_len = keys.shape[0], keys.shape[1]
        kept_images = image_keep_count(int(is_image.sum()), self.image_budget)
        n_keep = int((~is_image).sum()) + kept_images
        if self.rule == "random":
            generator = torch.Generator().manual_seed(self.seed)
            keep_idx = random_image_keep_indices(is_image, kept_images, heads, generator)
        elif self.rule == "recent":
            keep_idx = recent_keep_indices(heads, seq_len, n_keep, keys.device)
        elif self.rule == "scores":
            keep_idx = score_keep_indices(scores, n_keep)
        else:
            raise ValueError(f"unknown eviction baseline {self.rule!r}")
        kept_k, kept_v = merge_evicted(keys, values, keep_idx, None)
        return kept_k, kept_v, keep_idx
