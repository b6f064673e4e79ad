"""Naive KV-eviction rules, the controls LOOK-M is measured against at the same cache budget.

Each returns ``(H, n_keep)`` ascending prompt positions per KV head, like
:func:`mmrag.kernels.lookm.text_prior_keep_indices`, so the same gather/merge code compacts the cache:

- :func:`recent_keep_indices`: the last ``n_keep`` entries (a recent window, StreamingLLM without sinks);
- :func:`score_keep_indices`: the top ``n_keep`` by attention column sum, text unprotected (H2O's rule
  with no window: what LOOK-M's text prior adds is measured against this);
- :func:`random_image_keep_indices`: every text entry plus ``n_image_keep`` image entries drawn at random
  (what LOOK-M's scores add over chance).
"""

from __future__ import annotations

import torch

__all__ = ["image_keep_count", "random_image_keep_indices", "recent_keep_indices", "score_keep_indices"]


def image_keep_count(num_image: int, budget: float) -> int:
    """Image entries a ``budget`` share keeps: at least one while there are any (ceil of the share)."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"image KV budget must be in (0, 1], got {budget}")
    return min(num_image, max(1, -int(-num_image * budget // 1))) if num_image else 0


def recent_keep_indices(heads: int, seq_len: int, n_keep: int, device=None) -> torch.Tensor:
    start = max(0, seq_len - n_keep)
    return torch.arange(start, seq_len, device=device).expand(heads, -1).clone()


def score_keep_indices(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """``scores``: ``(H, L)``; the top ``n_keep`` per head, ascending positions."""
    top = scores.float().topk(min(n_keep, scores.shape[1]), dim=1).indices
    return top.sort(dim=1).values


def random_image_keep_indices(
    is_image: torch.Tensor, n_image_keep: int, heads: int, generator: torch.Generator
) -> torch.Tensor:
    """All text positions plus ``n_image_keep`` random image positions, drawn independently per head."""
    text = (~is_image).nonzero()[:, 0]
    image = is_image.nonzero()[:, 0]
    rows = []
    for _ in range(heads):
        chosen = image[torch.randperm(image.numel(), generator=generator)[:n_image_keep].to(image.device)]
        rows.append(torch.cat([text, chosen]).sort().values)
    return torch.stack(rows)
