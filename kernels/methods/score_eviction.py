"""Attention-score eviction without the text prior: the top entries by attention column sum, text
unprotected (H2O's rule with no window), at LOOK-M's image budget. What LOOK-M's text prior adds is
measured against this."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmrag.kernels.methods.base import ImageBudgetEviction, ScoreSource, attention_scores, check_score_source

if TYPE_CHECKING:
    import torch

__all__ = ["ScoreEviction"]


@dataclass(frozen=True)
class ScoreEviction(ImageBudgetEviction):
    name = "scores"

    score_from: ScoreSource = "auto"
    chunk_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        check_score_source(self.score_from, self.chunk_size)

    def scores(
        self, probs: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, scaling: float
    ) -> torch.Tensor | None:
        return attention_scores(self.score_from, self.chunk_size, probs, q, k, scaling)

    def keep_indices(self, scores: torch.Tensor | None, is_image: torch.Tensor, heads: int) -> torch.Tensor:
        from mmrag.kernels.kv_baselines import score_keep_indices

        assert scores is not None
        return score_keep_indices(scores, self.kept_count(is_image))
