"""AIM stage (b): PageRank importance over the prefill attention and the layer-wise pruning schedule.

Paper: AIM, Zhong et al. 2025 (https://arxiv.org/abs/2412.03248); code read: ``get_importance`` and the
decoder loop of the patched ``modeling_llama.py`` / ``modeling_qwen2.py`` in LaVi-Lab/AIM.

At every prefill layer ``l``:

1. ``M = softmax(logits / 0.1)`` over the layer's masked attention logits (``QK^T/sqrt(d) + mask``, masks
   included: pruned keys and the future are already at the dtype minimum);
2. PageRank with no damping: ``s = 1/N``, five times ``s = s @ M`` (per head);
3. importance = RMS over heads of ``s``;
4. rank tokens: text first (always kept), then live visual tokens by importance, then tokens already
   pruned; keep the first ``int(N_vis * rate[l] + N_text)``; a visual token outside that prefix is masked as
   a **key** in every later layer and during decoding (it still runs as a query: AIM only masks).

``rate[l]`` is 1 before ``start_layer`` and falls linearly to 0 at ``end_layer``: for LLaVA-1.5 (32 layers)
the authors use ``max(0, 1 - (l - 13 + 1) * 0.125)`` from layer 13, i.e. ``start_layer=13, end_layer=20``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmrag.kernels.selection import rank_by_tier

__all__ = ["AIMSchedule", "pagerank_importance", "select_live_tokens"]


def pagerank_importance(
    logits: torch.Tensor, temperature: float = 0.1, iterations: int = 5, damping: float = 0.0
) -> torch.Tensor:
    """Importance of every token as a key, from one layer's masked attention logits.

    Args:
        logits: ``(H, N, N)`` (or ``(B, H, N, N)``) pre-softmax scores with masks already added; rows are
            queries, columns keys.
        temperature: softmax temperature (AIM: 0.1, sharper than the model's own attention).
        iterations: power-iteration steps (AIM: 5).
        damping: PageRank teleport probability (AIM: 0).

    Returns:
        ``(N,)`` (or ``(B, N)``) float32: ``sqrt(mean_heads(s**2))`` of the stationary-ish distribution.
    """
    squeeze = logits.dim() == 3
    if squeeze:
        logits = logits[None]
    batch, heads, n, _ = logits.shape
    transition = torch.softmax(logits.float() / temperature, dim=-1)
    dist = torch.full((batch, heads, 1, n), 1.0 / n, dtype=torch.float32, device=logits.device)
    for _ in range(iterations):
        dist = (dist @ transition) * (1 - damping) + damping / n
    importance = dist.pow(2).mean(dim=1).sqrt().view(batch, n)
    return importance[0] if squeeze else importance


@dataclass(frozen=True)
class AIMSchedule:
    """Visual-token retention per decoder layer.

    Attributes:
        start_layer: first layer whose importance prunes (retention below 1 after it). Default 13
            (LLaVA-1.5-7B in the authors' code; 14 for Qwen2-7B).
        end_layer: first layer at which retention reaches 0 (default 20: ``13 + 1/0.125 - 1``).
    """

    start_layer: int = 13
    end_layer: int = 20

    def __post_init__(self) -> None:
        if not 0 <= self.start_layer <= self.end_layer:
            raise ValueError(f"need 0 <= start_layer <= end_layer, got {self.start_layer}, {self.end_layer}")

    def retention(self, layer: int) -> float:
        """Fraction of the prompt's visual tokens kept as keys for the layers after ``layer``."""
        if layer < self.start_layer:
            return 1.0
        step = 1.0 / (self.end_layer - self.start_layer + 1)
        return max(0.0, 1.0 - (layer - self.start_layer + 1) * step)

    def keep_count(self, layer: int, num_tokens: int, num_text: int) -> int:
        """Tokens (text included) left live after ``layer``, computed as the authors do (float, then int)."""
        return int((num_tokens - num_text) * self.retention(layer) + num_text)


def select_live_tokens(importance: torch.Tensor, is_text: torch.Tensor, live: torch.Tensor, keep: int) -> torch.Tensor:
    """The live-key mask for the next layer.

    Args:
        importance: ``(N,)`` PageRank importance of this layer.
        is_text: ``(N,)`` bool, tokens never pruned (system prompt and question).
        live: ``(N,)`` bool, keys live in this layer (pruning accumulates: dead stays dead).
        keep: tokens to keep, text included (:meth:`AIMSchedule.keep_count`).

    Returns:
        ``(N,)`` bool, ``live`` with all but the ``keep`` best-ranked tokens cleared.
    """
    if keep >= importance.numel():
        return live.clone()
    # Tiers as in the authors' code, where text gets importance 1.0 and pruned tokens -1.0.
    tier = torch.where(is_text, 2, torch.where(live, 1, 0))
    order = rank_by_tier(tier, importance.float())
    kept = torch.zeros_like(live)
    kept[order[:keep]] = True
    return live & kept
