"""Triton kernels for LOOK-M's attention column sums: ``O(H * L)`` extra memory, no probabilities stored.

Same contract as :func:`mmrag.kernels.attention_scores.attention_column_sums` (causal, queries are the
last ``Lq`` of ``L`` positions, grouped-query heads), without a key mask.

Two passes, both recomputing ``q . k`` tile by tile, FlashAttention-style:

1. ``_row_stats``: per query row, the running max ``m`` and normaliser ``l = sum exp(s - m)``;
2. ``_column_sums``: one program per (head, block of keys) walks the query blocks that can see those keys
   and adds ``exp(s - m) / l`` down each column. Each output element is written by exactly one program,
   in a fixed order: deterministic, no atomics.

Tiles are computed in float32 (``ieee`` dot), like the torch reference; a bf16 tensor-core variant is a
GPU tuning step not taken here. Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``, set
before ``triton`` is first imported (how the tests check it against the torch reference without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["attention_column_sums_triton"]


@triton.jit
def _row_stats(
    q_ptr, k_ptr, m_ptr, l_ptr,
    stride_qh, stride_qm, stride_kh, stride_kn,
    num_queries, seq_len, group, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    block_m, head = tl.program_id(0), tl.program_id(1)
    kv_head = head // group
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < num_queries
    q = tl.load(
        q_ptr + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0
    ).to(tl.float32)
    q_pos = offs_m + (seq_len - num_queries)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    # Causal: this block of rows sees keys up to its last row's position.
    last_key = tl.minimum(block_m * BLOCK_M + BLOCK_M + seq_len - num_queries, seq_len)
    for start_n in range(0, last_key, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(
            k_ptr + kv_head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
            mask=(offs_n < seq_len)[:, None],
            other=0.0,
        ).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
        s = tl.where((offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] < seq_len), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(m_ptr + head * num_queries + offs_m, m_i, mask=row_ok)
    tl.store(l_ptr + head * num_queries + offs_m, l_i, mask=row_ok)


@triton.jit
def _column_sums(
    q_ptr, k_ptr, m_ptr, l_ptr, out_ptr,
    stride_qh, stride_qm, stride_kh, stride_kn,
    num_queries, seq_len, group, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    block_n, head = tl.program_id(0), tl.program_id(1)
    kv_head = head // group
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < seq_len
    k = tl.load(
        k_ptr + kv_head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=col_ok[:, None], other=0.0
    ).to(tl.float32)
    offset = seq_len - num_queries
    acc = tl.zeros([BLOCK_N], tl.float32)
    # Only rows at positions >= this block's first key see it.
    first_row = tl.maximum(block_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
    for start_m in range(first_row, num_queries, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < num_queries
        q = tl.load(
            q_ptr + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        ).to(tl.float32)
        m_i = tl.load(m_ptr + head * num_queries + offs_m, mask=row_ok, other=0.0)
        l_i = tl.load(l_ptr + head * num_queries + offs_m, mask=row_ok, other=1.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
        p = tl.exp(s - m_i[:, None]) / l_i[:, None]
        visible = (offs_n[None, :] <= (offs_m + offset)[:, None]) & row_ok[:, None] & col_ok[None, :]
        acc += tl.sum(tl.where(visible, p, 0.0), axis=0)
    tl.store(out_ptr + head * seq_len + offs_n, acc, mask=col_ok)


def attention_column_sums_triton(
    q: torch.Tensor, k: torch.Tensor, scaling: float, block_m: int = 32, block_n: int = 32
) -> torch.Tensor:
    """``(Hq, L)`` float32 column sums of ``softmax(q k^T * scaling + causal)``.

    Args:
        q: ``(Hq, Lq, D)`` post-RoPE queries, ``D`` a power of two >= 16.
        k: ``(Hkv, L, D)`` post-RoPE keys, ``Hq % Hkv == 0``, ``L >= Lq``.
        block_m, block_n: query and key tile sizes (powers of two >= 16).
    """
    heads, num_queries, head_dim = q.shape
    kv_heads, seq_len, _ = k.shape
    q, k = q.contiguous(), k.contiguous()
    row_max = torch.empty(heads, num_queries, dtype=torch.float32, device=q.device)
    row_norm = torch.empty_like(row_max)
    out = torch.empty(heads, seq_len, dtype=torch.float32, device=q.device)
    common = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), num_queries, seq_len, heads // kv_heads)
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "HEAD_DIM": head_dim}
    _row_stats[(triton.cdiv(num_queries, block_m), heads)](q, k, row_max, row_norm, *common, scaling, **meta)
    _column_sums[(triton.cdiv(seq_len, block_n), heads)](q, k, row_max, row_norm, out, *common, scaling, **meta)
    return out
