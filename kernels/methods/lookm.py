"""LOOK-M (Wan et al. 2024): text-prior eviction of image KV entries after prefill, with merge compensation.

The tensor work is :mod:`mmrag.kernels.lookm` (selection and the three merges, with the paper's and the
authors' code's rules); this module is the method's settings and its place in the KV-method interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from mmrag.kernels.methods.base import KVMethod, ScoreSource, attention_scores, check_score_source, check_share

if TYPE_CHECKING:
    import torch

    from mmrag.kernels.lookm import LookMBudget

__all__ = ["LookM"]

_MERGES = ("pivotal", "averaged", "weighted", None)


@dataclass(frozen=True)
class LookM(KVMethod):
    """Attributes:
    heavy_ratio: share of the prompt kept by score outside the window (0.1); text is kept beyond it.
    recent_ratio: share of the prompt kept as a recent window (0.1).
    merge: ``"pivotal"`` (the authors' default), ``"averaged"``, ``"weighted"``, or ``None`` (evict only:
        the text-prior H2O baseline).
    score_from: where the column sums come from (:data:`~mmrag.kernels.methods.base.ScoreSource`).
    chunk_size: query rows per chunk for chunked scores.
    image_budget: if set, the budget is a share of the *image* entries instead of the two ratios: every text
        entry plus ``ceil(image_budget * n_image)`` image entries by score (no separate window). With short
        text-heavy prompts, ratios of the whole prompt leave no image entry at all, which measures nothing.
    """

    name = "lookm"

    heavy_ratio: float = 0.1
    recent_ratio: float = 0.1
    merge: Literal["pivotal", "averaged", "weighted"] | None = "pivotal"
    score_from: ScoreSource = "auto"
    chunk_size: int = 256
    image_budget: float | None = None

    def __post_init__(self) -> None:
        check_share("heavy_ratio", self.heavy_ratio, low_open=False)
        check_share("recent_ratio", self.recent_ratio, low_open=False)
        check_share("image_budget", self.image_budget)
        check_score_source(self.score_from, self.chunk_size)
        if self.merge not in _MERGES:
            raise ValueError(f"merge must be one of {list(_MERGES)}, not {self.merge!r}")

    def budget(self, is_image: torch.Tensor) -> LookMBudget:
        from mmrag.kernels.kv_baselines import image_keep_count
        from mmrag.kernels.lookm import LookMBudget

        if self.image_budget is None:
            return LookMBudget.from_ratios(is_image.numel(), self.heavy_ratio, self.recent_ratio)
        kept_images = image_keep_count(int(is_image.sum()), self.image_budget)
        return LookMBudget(heavy=int((~is_image).sum()) + kept_images, recent=0)

    def kept_count(self, is_image: torch.Tensor) -> int:
        budget, seq_len = self.budget(is_image), is_image.numel()
        return budget.kept_count(seq_len, int((~is_image[: seq_len - budget.recent]).sum()))

    def scores(
        self, probs: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, scaling: float
    ) -> torch.Tensor | None:
        return attention_scores(self.score_from, self.chunk_size, probs, q, k, scaling)

    def keep_indices(self, scores: torch.Tensor | None, is_image: torch.Tensor, heads: int) -> torch.Tensor:
        from mmrag.kernels.lookm import text_prior_keep_indices

        assert scores is not None
        return text_prior_keep_indices(scores, is_image, self.budget(is_image))

    def compress(
        self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None, is_image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from mmrag.kernels.lookm import merge_evicted

        keep_idx = self.keep_indices(scores, is_image, keys.shape[0])
        kept_k, kept_v = merge_evicted(keys, values, keep_idx, self.merge)
        return kept_k, kept_v, keep_idx
