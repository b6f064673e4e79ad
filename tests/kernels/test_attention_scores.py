"""LOOK-M's score from Q and K: chunked torch and Triton against the dense reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmrag.kernels.attention_scores import attention_column_sums, attention_column_sums_dense, sum_query_groups


def _qk(seed: int, heads: int, kv_heads: int, num_queries: int, seq_len: int, dim: int = 16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(heads, num_queries, dim, generator=gen), torch.randn(kv_heads, seq_len, dim, generator=gen)


def _explicit(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """Written without the module's helpers: full probabilities, GQA by repeat_interleave, triu mask."""
    keys = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    offset = k.shape[1] - q.shape[1]
    logits = q @ keys.transpose(1, 2) * scaling
    future = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).triu(offset + 1)
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1).sum(dim=1)


def test_dense_reference_is_the_column_sum() -> None:
    q, k = _qk(0, 4, 2, 9, 13)
    sums = attention_column_sums_dense(q, k, 0.25)
    torch.testing.assert_close(sums, _explicit(q, k, 0.25))
    # Each query row is a distribution: the columns add up to the number of queries.
    torch.testing.assert_close(sums.sum(dim=1), torch.full((4,), 9.0))
    # The last key is seen only by the last query, the first key by all of them.
    assert torch.all(sums[:, -1] <= 1.0)


@settings(max_examples=40, deadline=None, database=None)
@given(
    seed=st.integers(0, 2**16),
    groups=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]),
    num_queries=st.integers(1, 40),
    extra_keys=st.integers(0, 10),
    chunk=st.integers(1, 50),
    masked=st.booleans(),
)
def test_chunked_equals_dense(
    seed: int, groups: tuple[int, int], num_queries: int, extra_keys: int, chunk: int, masked: bool
) -> None:
    q, k = _qk(seed, groups[0], groups[1], num_queries, num_queries + extra_keys)
    key_mask = None
    if masked:
        key_mask = torch.rand(k.shape[1], generator=torch.Generator().manual_seed(seed)) < 0.7
        key_mask[0] = True  # every row keeps one visible key
    dense = attention_column_sums_dense(q, k, 0.3, key_mask)
    chunked = attention_column_sums(q, k, 0.3, chunk_size=chunk, key_mask=key_mask)
    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-5)
    if key_mask is not None:
        assert torch.all(chunked[:, ~key_mask] == 0)


def test_chunked_accepts_bf16_and_accumulates_in_fp32() -> None:
    q, k = _qk(1, 2, 1, 20, 20)
    out = attention_column_sums(q.bfloat16(), k.bfloat16(), 0.25, chunk_size=7)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, attention_column_sums_dense(q.bfloat16(), k.bfloat16(), 0.25))


def test_sum_query_groups() -> None:
    scores = torch.arange(12.0).view(4, 3)
    assert sum_query_groups(scores, 2).tolist() == [[3.0, 5.0, 7.0], [15.0, 17.0, 19.0]]
    assert torch.equal(sum_query_groups(scores, 4), scores)


def test_triton_equals_dense() -> None:
    """The Triton kernel (compiled on a GPU, else Triton's CPU interpreter) against the dense reference."""
    pytest.importorskip("triton")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    script = Path(__file__).with_name("triton_check.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("max abs error") == 4
