"""LOOK-M: text-prior KV eviction after prefill, with merge compensation.

Paper: LOOK-M, Wan et al. 2024 (https://arxiv.org/abs/2406.18139); code read: SUSTechBruce/LOOK-M
``llava/model/kv_token_merge/modify_llama.py`` (``TextPivotMerge_LayerWise``,
``TextAVGMergeKVCache_LayerWise``, ``TextWeightedMerge_LayerWise``). Runs once per layer after prefill,
on one sequence; decode tokens are appended and never evicted.

Selection, per KV head (``scores``: column sums of the prefill attention over **all** prompt queries):

- ``heavy = int(L * heavy_ratio)``, ``recent = int(L * recent_ratio)`` (defaults 0.1 and 0.1);
  if ``L <= heavy + recent`` nothing is evicted;
- the last ``recent`` tokens are kept;
- of the others, the first ``heavy`` by ``(is_text, score)`` are kept, **and every text token** is kept
  whatever ``heavy`` is; so each head keeps ``max(heavy, text outside the window) + recent`` tokens: the
  same count in every head and layer, different members.

Merge, per head: each evicted entry ``e`` is assigned to the kept entry ``p(e)`` whose key is most
cosine-similar (``s(e)`` that similarity); the same assignment moves the values.

- ``pivotal`` (the authors' default script): ``kv_k <- mean({kv_k} + {(kv_e + kv_k) / 2 : p(e) = k})``;
- ``averaged``: ``kv_k <- mean({kv_k} + {kv_e : p(e) = k, e passes the filter})``;
- ``weighted``: ``kv_k <- mean({kv_k} + {s(e) * kv_e : p(e) = k, e passes the filter})`` (raw cosines,
  not normalised: not a convex combination, as in the code).

The filter keeps evicted *slot* ``i`` (the i-th evicted entry of every head) when the mean over heads of
its similarity is at least the mean over all slots and heads, the authors' rule. Their ``averaged`` code
pairs the filtered indices with the unfiltered source tensor; we pair filtered with filtered, which is
what the ``weighted`` code does and what the indices are for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from mmrag.kernels.selection import rank_by_tier

__all__ = [
    "LookMBudget",
    "MergeStrategy",
    "evicted_indices",
    "merge_evicted",
    "text_prior_keep_indices",
]

MergeStrategy = Literal["pivotal", "averaged", "weighted"]


@dataclass(frozen=True)
class LookMBudget:
    """Token budget of one layer's compression.

    Attributes:
        heavy: tokens kept by score outside the recent window (text first).
        recent: the last ``recent`` prompt tokens, always kept.
    """

    heavy: int
    recent: int

    @classmethod
    def from_ratios(cls, seq_len: int, heavy_ratio: float = 0.1, recent_ratio: float = 0.1) -> LookMBudget:
        return cls(heavy=int(seq_len * heavy_ratio), recent=int(seq_len * recent_ratio))

    def kept_count(self, seq_len: int, num_text_outside_window: int) -> int:
        if seq_len <= self.heavy + self.recent:
            return seq_len
        return max(self.heavy, num_text_outside_window) + self.recent


def text_prior_keep_indices(scores: torch.Tensor, is_image: torch.Tensor, budget: LookMBudget) -> torch.Tensor:
    """Which prompt entries each head keeps.

    Args:
        scores: ``(H, L)`` attention column sums per (KV) head.
        is_image: ``(L,)`` bool, entries of image tokens; all others are text.
        budget: heavy-hitter and recent-window sizes.

    Returns:
        ``(H, n_keep)`` long, ascending positions, ``n_keep = budget.kept_count(...)`` for every head.
    """
    heads, seq_len = scores.shape
    if seq_len <= budget.heavy + budget.recent:
        return torch.arange(seq_len, device=scores.device).expand(heads, -1).clone()
    split = seq_len - budget.recent
    is_text = ~is_image
    # Rank by (is_text, score), not score - 65516 * is_image as the authors do (see rank_by_tier).
    tier = is_text[:split].long().expand(heads, -1)
    order = rank_by_tier(tier, scores[:, :split].float())
    keep = torch.zeros(heads, seq_len, dtype=torch.bool, device=scores.device)
    keep.scatter_(1, order[:, : budget.heavy], True)
    keep |= is_text
    keep[:, split:] = True
    return keep.nonzero()[:, 1].view(heads, -1)


def evicted_indices(keep_idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``(H, L - n_keep)`` ascending positions not in ``keep_idx`` (``(H, n_keep)``)."""
    heads = keep_idx.shape[0]
    evicted = torch.ones(heads, seq_len, dtype=torch.bool, device=keep_idx.device)
    evicted.scatter_(1, keep_idx, False)
    return evicted.nonzero()[:, 1].view(heads, -1)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _most_similar_kept(evicted: torch.Tensor, kept: torch.Tensor, rows: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, each evicted key's best cosine similarity to a kept key and that key's index, ``(H, n_evicted)``.

    ``rows`` evicted keys at a time into one reused buffer: the whole ``(H, n_evicted, n_keep)`` matrix is
    350 MiB at 8k tokens, and writing it (fresh pages) then reading it for the maximum took most of the merge.
    """
    ev = F.normalize(evicted.float(), dim=-1)
    kept_t = F.normalize(kept.float(), dim=-1).transpose(1, 2)
    (heads, count, _), n_keep = ev.shape, kept_t.shape[2]
    sim = ev.new_empty(heads, count)
    target = torch.empty(heads, count, dtype=torch.long, device=ev.device)
    buffer = ev.new_empty(heads * min(rows, count) * n_keep)
    for start in range(0, count, rows):
        stop = min(start + rows, count)
        block = buffer[: heads * (stop - start) * n_keep].view(heads, stop - start, n_keep)
        torch.matmul(ev[:, start:stop], kept_t, out=block)
        sim[:, start:stop], target[:, start:stop] = block.max(dim=-1)
    return sim, target


def merge_evicted(
    keys: torch.Tensor,
    values: torch.Tensor,
    keep_idx: torch.Tensor,
    strategy: MergeStrategy | None = "pivotal",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact one layer's prompt KV to the kept entries, folding the evicted ones in.

    Args:
        keys, values: ``(H, L, D)`` post-RoPE prompt keys and values of one sequence.
        keep_idx: ``(H, n_keep)`` from :func:`text_prior_keep_indices`.
        strategy: ``"pivotal"``, ``"averaged"``, ``"weighted"``, or ``None`` to evict without merging.

    Returns:
        ``(keys, values)``, each ``(H, n_keep, D)``, in ``keep_idx`` order.
    """
    kept_k, kept_v = _gather(keys, keep_idx), _gather(values, keep_idx)
    evict_idx = evicted_indices(keep_idx, keys.shape[1])
    if strategy is None or evict_idx.shape[1] == 0:
        return kept_k, kept_v
    ev_k, ev_v = _gather(keys, evict_idx), _gather(values, evict_idx)
    sim, target = _most_similar_kept(ev_k, kept_k)
    if strategy == "pivotal":
        src_k = (ev_k + _gather(kept_k, target)) / 2
        src_v = (ev_v + _gather(kept_v, target)) / 2
    elif strategy in ("averaged", "weighted"):
        passes = sim.mean(dim=0) >= sim.mean()
        target, ev_k, ev_v, sim = target[:, passes], ev_k[:, passes], ev_v[:, passes], sim[:, passes]
        weight = sim[..., None].to(keys.dtype) if strategy == "weighted" else 1
        src_k, src_v = weight * ev_k, weight * ev_v
    else:
        raise ValueError(f"unknown LOOK-M merge strategy {strategy!r}")
    index_k = target[..., None].expand(-1, -1, keys.shape[-1])
    index_v = target[..., None].expand(-1, -1, values.shape[-1])
    merged_k = kept_k.scatter_reduce(1, index_k, src_k, reduce="mean", include_self=True)
    merged_v = kept_v.scatter_reduce(1, index_v, src_v, reduce="mean", include_self=True)
    return merged_k, merged_v
