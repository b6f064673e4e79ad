"""The ranking rule that AIM's pruning and LOOK-M's eviction share: protected tokens first, then by score.

Both methods protect text tokens from eviction. The authors encode the protection in the score itself
(AIM sets text importance to 1.0 and pruned tokens to -1.0; LOOK-M subtracts 65516 from image scores).
Here the tier is a separate sort key: lexicographic, exact in any dtype, and equal to the authors'
ranking whenever theirs is well defined.
"""

from __future__ import annotations

import torch

__all__ = ["rank_by_tier"]


def rank_by_tier(tier: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Indices sorting by ``(tier, score)`` descending along the last dim, ties by position.

    Args:
        tier: integer tensor, higher tiers first (e.g. 1 for text, 0 for image).
        score: same shape, the order within a tier.

    NOTE: adding a large constant to protected tokens instead (LOOK-M's ``-65516``) collapses the
    ranking in bf16: near 65516, representable values are 256 apart, so most image scores become equal.
    """
    by_score = score.argsort(dim=-1, descending=True, stable=True)
    by_tier = tier.gather(-1, by_score).argsort(dim=-1, descending=True, stable=True)
    return by_score.gather(-1, by_tier)
