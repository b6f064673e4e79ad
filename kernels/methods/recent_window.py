"""Recent window: the last entries of the prompt (StreamingLLM without sinks), as many as LOOK-M keeps at
the same image budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmrag.kernels.methods.base import ImageBudgetEviction

if TYPE_CHECKING:
    import torch

__all__ = ["RecentWindow"]


@dataclass(frozen=True)
class RecentWindow(ImageBudgetEviction):
    name = "recent"

    def keep_indices(self, scores: torch.Tensor | None, is_image: torch.Tensor, heads: int) -> torch.Tensor:
        from mmrag.kernels.kv_baselines import recent_keep_indices

        return recent_keep_indices(heads, is_image.numel(), self.kept_count(is_image), is_image.device)
