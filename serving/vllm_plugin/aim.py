"""AIM stage (a) at a keep ratio: how many visual tokens an image keeps, and the merge that gets there.

vLLM expands each ``<image>`` placeholder in the frontend, before the vision tower runs, so the kept
count must be a pure function of the image's token count and the ratio. It is
``max(1, ceil(T * ratio))``, reached by bipartite passes (:mod:`mmrag.kernels.token_merge`) of
``min(t // 2, t - kept)`` merges each. For ratios 1/2, 1/4, ... every pass halves, which is exactly the
reference engine's :class:`~mmrag.serving.reference.methods.AIMMerge` with 1, 2, ... passes
(``ceil(ceil(T/2)/2) == ceil(T/4)``, odd ``T`` included). No vLLM import here: the processor (frontend)
and the model (worker) both call these functions, and the tests call them without vLLM.
"""

from __future__ import annotations

import math

import torch

from mmrag.kernels.token_merge import merge_tokens

__all__ = [
    "DEFAULT_KEEP_RATIO",
    "KEEP_RATIO_KEY",
    "aim_kept_tokens",
    "aim_merge",
    "check_keep_ratio",
    "merge_schedule",
    "merge_to_count",
]

DEFAULT_KEEP_RATIO = 1.0
# The per-request ``mm_processor_kwargs`` key and the ``hf_config`` attribute (deployment default).
KEEP_RATIO_KEY = "aim_keep_ratio"
# Slack for ratios such as 0.3 whose product with T lands a rounding error above an integer.
_EPS = 1e-9


def check_keep_ratio(ratio: float) -> float:
    """``ratio`` as a float in ``(0, 1]``; anything else is a ``ValueError``."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float):
        raise ValueError(f"aim_keep_ratio must be a number in (0, 1], got {ratio!r}")
    ratio = float(ratio)
    if not (0.0 < ratio <= 1.0) or math.isnan(ratio):
        raise ValueError(f"aim_keep_ratio must be in (0, 1], got {ratio}")
    return ratio


def aim_kept_tokens(num_tokens: int, ratio: float) -> int:
    """Visual tokens one image keeps: ``max(1, ceil(num_tokens * ratio))`` (``num_tokens`` at ratio 1)."""
    ratio = check_keep_ratio(ratio)
    if num_tokens <= 0:
        return num_tokens
    return min(num_tokens, max(1, math.ceil(num_tokens * ratio - _EPS)))


def merge_schedule(num_tokens: int, kept: int) -> list[int]:
    """Merges per bipartite pass (each at most half the tokens left) to go from ``num_tokens`` to ``kept``."""
    if not 1 <= kept <= num_tokens:
        raise ValueError(f"cannot merge {num_tokens} tokens to {kept}")
    schedule, current = [], num_tokens
    while current > kept:
        r = min(current // 2, current - kept)
        schedule.append(r)
        current -= r
    return schedule


def merge_to_count(features: torch.Tensor, kept: int) -> torch.Tensor:
    """Merge ``(F, T, C)`` visual features (F images of T tokens) to ``(F, kept, C)``.

    AIM's unweighted mean; the metric is the features themselves (the projected tokens), as in the
    reference engine.
    """
    for r in merge_schedule(features.shape[1], kept):
        features = merge_tokens(features, num_passes=1, r=r).tokens
    return features


def aim_merge(features: torch.Tensor, ratio: float) -> torch.Tensor:
    """``(F, T, C)`` -> ``(F, aim_kept_tokens(T, ratio), C)``."""
    return merge_to_count(features, aim_kept_tokens(features.shape[1], ratio))
