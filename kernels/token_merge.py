"""Bipartite soft matching (ToMe), the visual-token merge of AIM stage (a).

Papers: ToMe, Bolya et al. 2023 (https://arxiv.org/abs/2210.09461); AIM, Zhong et al. 2025
(https://arxiv.org/abs/2412.03248), code ``llava/model/token_merge.py``.

One pass over ``F`` frames (images) of ``T`` tokens each, every frame on its own:

1. split the tokens alternately into A (even positions) and B (odd positions);
2. cosine similarity of every A token to every B token on a metric (AIM: the projected visual features);
3. each A token picks its most similar B token; the ``r`` A tokens with the highest similarity are merged
   into their B token, the other A tokens are kept;
4. output: the kept A tokens (in order of decreasing similarity, as ToMe and AIM return them) then all of
   B (in their original order), ``T - r`` tokens: the count depends only on ``T`` and ``r``, never on the
   data, which is what lets a server size the image placeholders before the image is seen.

AIM merges with an **unweighted** mean (``scatter_reduce("mean", include_self=True)``, no size tracking),
so after two passes a token is the mean of means; ToMe's size-weighted merge tracks how many input
tokens each output token stands for and keeps every output an exact mean of its inputs. Both are here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "BipartiteMatch",
    "MergeResult",
    "bipartite_soft_matching",
    "merge_tokens",
    "merged_token_count",
    "spread_positions",
]


@dataclass(frozen=True)
class BipartiteMatch:
    """The outcome of one matching pass, reusable on any tensor with the same ``(F, T)`` layout.

    Attributes:
        num_tokens: ``T``, tokens per frame before the pass.
        r: merges per frame actually made (``min(r, T // 2)``).
        unmerged_idx: ``(F, ceil(T/2) - r)`` A-set indices that stay, most similar first.
        src_idx: ``(F, r)`` A-set indices merged away.
        dst_idx: ``(F, r)`` B-set indices that ``src_idx`` merge into.
    """

    num_tokens: int
    r: int
    unmerged_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor

    @property
    def num_output(self) -> int:
        return self.num_tokens - self.r

    def merge(self, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """Apply the match to ``x`` of shape ``(F, T, C)``; returns ``(F, T - r, C)``.

        ``mode`` is the ``scatter_reduce`` reduction into B: ``"mean"`` (AIM) or ``"sum"`` (ToMe's
        size-weighted merge sums ``x * size`` and ``size``, then divides).
        """
        if self.r == 0:
            return x
        frames, _, channels = x.shape
        a, b = x[:, ::2], x[:, 1::2]
        num_unmerged = self.unmerged_idx.shape[1]
        unm = a.gather(1, self.unmerged_idx[..., None].expand(frames, num_unmerged, channels))
        src = a.gather(1, self.src_idx[..., None].expand(frames, self.r, channels))
        dst = b.scatter_reduce(
            1, self.dst_idx[..., None].expand(frames, self.r, channels), src, reduce=mode, include_self=True
        )
        return torch.cat([unm, dst], dim=1)

    def output_index(self) -> torch.Tensor:
        """``(F, T)`` long: the output slot that each input token ends up in (merged or kept)."""
        frames = self.src_idx.shape[0]
        device = self.src_idx.device
        if self.r == 0:
            return torch.arange(self.num_tokens, device=device).expand(frames, -1).clone()
        num_a = (self.num_tokens + 1) // 2
        num_unmerged = self.unmerged_idx.shape[1]
        a_slot = torch.empty(frames, num_a, dtype=torch.long, device=device)
        a_slot.scatter_(1, self.unmerged_idx, torch.arange(num_unmerged, device=device).expand(frames, -1))
        a_slot.scatter_(1, self.src_idx, num_unmerged + self.dst_idx)
        b_slot = num_unmerged + torch.arange(self.num_tokens // 2, device=device).expand(frames, -1)
        out = torch.empty(frames, self.num_tokens, dtype=torch.long, device=device)
        out[:, ::2] = a_slot
        out[:, 1::2] = b_slot
        return out


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> BipartiteMatch:
    """Match A (even) to B (odd) tokens of each frame by cosine similarity of ``metric``.

    Args:
        metric: ``(F, T, C)`` features to compare (AIM: the projected visual tokens).
        r: merges wanted per frame; clipped to ``T // 2`` (every A token merged).

    Ties are broken by position (stable sort), so the same input always gives the same match.
    """
    frames, num_tokens, _ = metric.shape
    r = max(0, min(r, num_tokens // 2))
    device = metric.device
    if r == 0:
        empty = torch.empty(frames, 0, dtype=torch.long, device=device)
        return BipartiteMatch(num_tokens, 0, empty, empty, empty)
    # NOTE: similarity in fp32 whatever the feature dtype: ranking bf16 cosines collapses near-ties.
    normed = F.normalize(metric.float(), dim=-1)
    scores = normed[:, ::2] @ normed[:, 1::2].transpose(1, 2)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)
    src_idx = edge_idx[:, :r]
    return BipartiteMatch(
        num_tokens=num_tokens,
        r=r,
        unmerged_idx=edge_idx[:, r:],
        src_idx=src_idx,
        dst_idx=node_idx.gather(1, src_idx),
    )


@dataclass(frozen=True)
class MergeResult:
    """Tokens after one or more passes.

    Attributes:
        tokens: ``(F, T_out, C)`` merged tokens.
        size: ``(F, T_out)`` how many input tokens each output token stands for.
        source_index: ``(F, T)`` the output slot of every input token (each input in exactly one slot).
    """

    tokens: torch.Tensor
    size: torch.Tensor
    source_index: torch.Tensor


def merged_token_count(num_tokens: int, num_passes: int, r: int | None = None) -> int:
    """Tokens per frame after ``num_passes`` passes of ``r`` merges (``None``: ``T // 2``, AIM's choice).

    A pure function of the sizes: the placeholder count a server reserves per image.
    """
    for _ in range(num_passes):
        num_tokens -= min(num_tokens // 2 if r is None else r, num_tokens // 2)
    return num_tokens


def spread_positions(num_tokens: int, kept: int) -> list[int]:
    """Position offsets, inside the image's original span of ``num_tokens``, for its ``kept`` merged tokens.

    AIM gives merged tokens contiguous positions, so every later token moves ``num_tokens - kept`` closer to
    the image. A model that locates image k by RoPE distance then misreads which image is which: on the
    trained tiny LLaVA, colour of image k at 1/2 and 1/4 fell to 0.60 / 0.52 with contiguous positions and
    stayed at 1.00 / 0.98 with these (README, AIM). Token ``j`` takes the centre of its ``num_tokens / kept``
    share of the span, and the text after the image keeps its original positions. A pure function of the
    two counts (never of the merge), so vLLM's frontend can lay positions out before the image is seen.
    """
    if not 1 <= kept <= num_tokens:
        raise ValueError(f"cannot place {kept} tokens in a span of {num_tokens}")
    return [int((j + 0.5) * num_tokens / kept) for j in range(kept)]


def merge_tokens(
    x: torch.Tensor,
    num_passes: int,
    r: int | None = None,
    weighted: bool = False,
    metric: torch.Tensor | None = None,
) -> MergeResult:
    """Merge each frame of ``x`` (``(F, T, C)``) in ``num_passes`` bipartite passes.

    AIM (LLaVA-OneVision) runs two passes with ``r = T // 2`` on the projected features, 196 -> 98 -> 49
    tokens per frame; that is ``r=None`` here. The metric of the first pass is ``metric`` (default ``x``);
    later passes compare the merged tokens themselves, as AIM's repeated calls do.

    Args:
        weighted: ``False``: AIM's unweighted mean. ``True``: ToMe's size-weighted mean, so every output
            token is the exact mean of the input tokens in its slot.
    """
    frames, num_tokens, _ = x.shape
    size = torch.ones(frames, num_tokens, 1, dtype=x.dtype, device=x.device)
    source_index = torch.arange(num_tokens, device=x.device).expand(frames, -1).clone()
    metric = x if metric is None else metric
    for _ in range(num_passes):
        current = x.shape[1]
        match = bipartite_soft_matching(metric, current // 2 if r is None else r)
        if weighted:
            x = match.merge(x * size, mode="sum")
            size = match.merge(size, mode="sum")
            x = x / size
        else:
            x = match.merge(x, mode="mean")
            size = match.merge(size, mode="sum")
        source_index = match.output_index().gather(1, source_index)
        metric = x
    return MergeResult(tokens=x, size=size[..., 0], source_index=source_index)
