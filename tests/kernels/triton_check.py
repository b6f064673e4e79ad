"""Compare the Triton column-sum kernel with the dense torch reference; exit status 1 on a mismatch.

Run as a script (the tests start it in a fresh interpreter): Triton's CPU interpreter is chosen when
``triton`` is first imported, so ``TRITON_INTERPRET=1`` must be set before anything imports it.
"""

from __future__ import annotations

import sys

import torch

from mmrag.kernels.attention_scores import attention_column_sums_dense
from mmrag.kernels.attention_scores_triton import attention_column_sums_triton

# (query heads, kv heads, queries, keys, head dim, block): GQA, queries < keys, ragged tails.
SHAPES = [(1, 1, 16, 16, 16, 16), (2, 1, 33, 33, 64, 16), (4, 2, 20, 45, 32, 16), (3, 3, 50, 50, 16, 32)]


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    worst = 0.0
    for heads, kv_heads, num_queries, seq_len, dim, block in SHAPES:
        gen = torch.Generator().manual_seed(seq_len)
        q = torch.randn(heads, num_queries, dim, generator=gen)
        k = torch.randn(kv_heads, seq_len, dim, generator=gen)
        got = attention_column_sums_triton(q.to(device), k.to(device), dim**-0.5, block, block).cpu()
        want = attention_column_sums_dense(q, k, dim**-0.5)
        error = float((got - want).abs().max())
        worst = max(worst, error)
        print(f"H={heads} Hkv={kv_heads} Lq={num_queries} L={seq_len} D={dim}: max abs error {error:.3g}")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
