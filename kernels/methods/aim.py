"""AIM (Zhong et al. 2024): visual tokens merged before the LLM (stage a) and pruned inside it (stage b).

The tensor work is :mod:`mmrag.kernels.aim` and :mod:`mmrag.kernels.token_merge`; these are the two
stages' settings, each with the one function its engine calls (the vLLM model class runs the merge, the
reference engine both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mmrag.kernels.aim import AIMSchedule, pagerank_importance, select_live_tokens
from mmrag.kernels.token_merge import MergeResult, merge_tokens, merged_token_count

__all__ = ["AIMMerge", "AIMPrune"]


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
