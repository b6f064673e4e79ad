"""LOOK-M's importance score, the column sums of a layer's prefill attention, computed from Q and K.

``score[h, j] = sum_i softmax_j(q_i . k_j * scaling + causal)`` over every prompt query ``i``.

Fused attention kernels (FlashAttention, vLLM's) never materialise the probabilities, so the score has
to be recomputed from Q and K. The dense form holds the whole ``(H, L, L)`` matrix; :func:`attention_column_sums`
walks the queries in chunks of ``chunk_size`` rows, each row's softmax needing only that row, so peak
extra memory is ``O(H * chunk_size * L)``: linear in ``L`` for a fixed chunk. The Triton kernel in
:mod:`mmrag.kernels.attention_scores_triton` goes further (``O(H * L)``, no probabilities stored at all).

Queries are the last ``Lq`` of the ``L`` positions (``Lq == L`` for a whole prefill), so query ``i`` sees
keys ``0 .. L - Lq + i``. Grouped-query attention: query head ``h`` reads KV head ``h // (Hq / Hkv)``.
"""

from __future__ import annotations

import torch

__all__ = ["attention_column_sums", "attention_column_sums_dense", "sum_query_groups"]


def _masked_logits(
    q: torch.Tensor, k: torch.Tensor, scaling: float, first_pos: int, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """``(Hq, rows, L)`` float32 logits of queries at ``first_pos ..`` with causal and key masks applied."""
    (heads, rows, dim), (kv_heads, seq_len, _) = q.shape, k.shape
    # Queries of one KV group side by side: no (Hq, L, D) copy of the keys.
    grouped = q.float().reshape(kv_heads, heads // kv_heads * rows, dim)
    # In place from here on: one (Hq, rows, L) buffer per chunk.
    logits = (grouped @ k.float().transpose(1, 2)).view(heads, rows, seq_len).mul_(scaling)
    q_pos = torch.arange(first_pos, first_pos + rows, device=q.device)
    hidden = torch.arange(seq_len, device=q.device)[None, :] > q_pos[:, None]
    if key_mask is not None:
        hidden |= ~key_mask[None, :]
    return logits.masked_fill_(hidden, float("-inf"))


def attention_column_sums_dense(
    q: torch.Tensor, k: torch.Tensor, scaling: float, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference: materialise ``(Hq, Lq, L)`` probabilities and sum over queries.

    Args:
        q: ``(Hq, Lq, D)`` post-RoPE queries. k: ``(Hkv, L, D)`` post-RoPE keys, ``Hq % Hkv == 0``.
        key_mask: ``(L,)`` bool, keys allowed (default all).

    Returns:
        ``(Hq, L)`` float32 column sums.
    """
    first_pos = k.shape[1] - q.shape[1]
    return torch.softmax(_masked_logits(q, k, scaling, first_pos, key_mask), dim=-1).sum(dim=1)


def attention_column_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    chunk_size: int = 256,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same sums as :func:`attention_column_sums_dense`, ``chunk_size`` query rows at a time.

    Shapes as in :func:`attention_column_sums_dense`. Accumulates in float32 whatever the input dtype.
    """
    num_queries, offset = q.shape[1], k.shape[1] - q.shape[1]
    out = torch.zeros(q.shape[0], k.shape[1], dtype=torch.float32, device=q.device)
    for start in range(0, num_queries, chunk_size):
        # Row q_pos only reaches keys <= q_pos: trim the key range of this chunk to what it can see.
        stop = min(start + chunk_size, num_queries)
        visible = offset + stop
        chunk_mask = None if key_mask is None else key_mask[:visible]
        logits = _masked_logits(q[:, start:stop], k[:, :visible], scaling, offset + start, chunk_mask)
        out[:, :visible] += _softmax_(logits).sum(dim=1)
    return out


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Row softmax in the logits' own buffer (``torch.softmax`` would allocate a second one)."""
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=-1, keepdim=True))


def sum_query_groups(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``(Hq, L)`` -> ``(Hkv, L)``: one score per KV head (the unit that is evicted), summed over its group.

    LOOK-M's code targets multi-head attention (one query head per KV head), where this is the identity.
    """
    heads, seq_len = scores.shape
    return scores.view(num_kv_heads, heads // num_kv_heads, seq_len).sum(dim=1)
