"""Random eviction: every text entry plus image entries drawn at random, per KV head (what LOOK-M's scores
add over chance, at the same budget). Every layer draws from a fresh generator with the same seed, so the
reference engine and vLLM's worker keep the same entries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmrag.kernels.methods.base import ImageBudgetEviction

if TYPE_CHECKING:
    import torch

__all__ = ["RandomEviction"]


@dataclass(frozen=True)
class RandomEviction(ImageBudgetEviction):
    name = "random"

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    def keep_indices(self, scores: torch.Tensor | None, is_image: torch.Tensor, heads: int) -> torch.Tensor:
        import torch

        from mmrag.kernels.kv_baselines import image_keep_count, random_image_keep_indices

        generator = torch.Generator().manual_seed(self.seed)
        kept_images = image_keep_count(int(is_image.sum()), self.image_budget)
        return random_image_keep_indices(is_image, kept_images, heads, generator)
