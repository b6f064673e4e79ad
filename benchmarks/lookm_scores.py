"""``mmrag bench lookm-scores``: peak memory of LOOK-M's score (attention column sums) as the prompt grows.

The score needs every prefill query's softmax row. Three ways to get it from Q and K
(:mod:`mmrag.kernels.attention_scores`):

- ``dense``: the whole ``(H, L, L)`` probability matrix at once (what the authors' eager code holds);
- ``chunked``: ``chunk_size`` query rows at a time, ``O(H * chunk * L)``;
- ``triton``: the two-pass kernel, ``O(H * L)`` (CUDA only; Triton's CPU interpreter is for tests).

Each (method, length) runs in a fresh process. On CPU the peak is the process's resident-set high-water
mark (``VmHWM``, reset through ``/proc/self/clear_refs`` after Q and K exist) minus the resident set at
that moment; on CUDA it is ``max_memory_allocated`` above the inputs. Figures: peak MiB per method and
length, ``chunked / dense`` at each length, and the growth exponent between the two largest lengths
(``log2`` of the peak ratio when ``L`` doubles: about 2 for dense, about 1 for chunked).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HELP = "LOOK-M score from Q and K: peak memory of dense vs chunked (vs Triton on CUDA) by prompt length."

DEFAULT_LENGTHS = (1024, 2048, 4096)
QUICK_LENGTHS = (512, 1024, 2048)
CUDA_REPEATS = 5  # timed calls per measurement on a GPU (median reported); one on the CPU, where it is slow


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", default=None, help="Comma-separated prompt lengths (default 1024,2048,4096).")
    parser.add_argument("--heads", type=int, default=8, help="Query heads (default 8).")
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads (default 8).")
    parser.add_argument("--head-dim", type=int, default=128, help="Head size (default 128).")
    parser.add_argument("--chunk-size", type=int, default=256, help="Query rows per chunk (default 256).")


def _rss_kib() -> tuple[int, int]:
    """Current and peak resident set of this process, KiB."""
    status = Path("/proc/self/status").read_text()
    current, peak = (int(re.search(rf"{key}:\s+(\d+)", status).group(1)) for key in ("VmRSS", "VmHWM"))
    return current, peak


def _child(method: str, seq_len: int, heads: int, kv_heads: int, head_dim: int, chunk: int) -> dict[str, float]:
    """One measurement, in this (fresh) process: extra peak MiB and seconds."""
    import torch

    from mmrag.kernels.attention_scores import attention_column_sums, attention_column_sums_dense

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seq_len)
    q = torch.randn(heads, seq_len, head_dim, generator=gen, device=device)
    k = torch.randn(kv_heads, seq_len, head_dim, generator=gen, device=device)
    scaling = head_dim**-0.5
    if method == "dense":
        fn = lambda: attention_column_sums_dense(q, k, scaling)  # noqa: E731
    elif method == "chunked":
        fn = lambda: attention_column_sums(q, k, scaling, chunk_size=chunk)  # noqa: E731
    else:
        from mmrag.kernels.attention_scores_triton import attention_column_sums_triton

        fn = lambda: attention_column_sums_triton(q, k, scaling)  # noqa: E731
    if device == "cuda":
        fn()  # compile and warm up outside the measurement
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        times = []
        for _ in range(CUDA_REPEATS):
            start = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds = sorted(times)[len(times) // 2]
        extra = torch.cuda.max_memory_allocated() - before
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        before_kib, _ = _rss_kib()
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
        extra = (_rss_kib()[1] - before_kib) * 1024
    # Position-weighted: a plain sum is H * Lq for any row-normalised output and would check nothing.
    checksum = float((out.cpu() * torch.linspace(0, 1, seq_len)).sum())
    return {"peak_mib": extra / 2**20, "seconds": seconds, "checksum": checksum}


def _measure(method: str, seq_len: int, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, "-m", "mmrag.benchmarks.lookm_scores", method, str(seq_len)]
    cmd += [str(args.heads), str(args.kv_heads), str(args.head_dim), str(args.chunk_size)]
    # A fixed mmap threshold: glibc otherwise raises it after big frees and serves later tensors from
    # already-resident heap, hiding them from the high-water mark.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _exponent(peaks: dict[int, float]) -> float | None:
    lengths = sorted(peaks)
    if len(lengths) < 2 or min(peaks[lengths[-1]], peaks[lengths[-2]]) <= 0:
        return None
    return math.log(peaks[lengths[-1]] / peaks[lengths[-2]]) / math.log(lengths[-1] / lengths[-2])


def run(args: argparse.Namespace) -> int:
    import torch

    from mmrag.benchmarks.common import write_result

    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
    else:
        lengths = list(QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    methods = ["dense", "chunked"] + (["triton"] if torch.cuda.is_available() else [])
    rows: dict[str, dict[int, dict[str, float]]] = {m: {} for m in methods}
    for seq_len in lengths:
        for method in methods:
            rows[method][seq_len] = _measure(method, seq_len, args)
            print(f"L={seq_len:6d} {method:8s} peak {rows[method][seq_len]['peak_mib']:9.1f} MiB", flush=True)
    figures: dict[str, Any] = {
        "lengths": lengths,
        "peak_mib": {m: [rows[m][n]["peak_mib"] for n in lengths] for m in methods},
        "seconds": {m: [rows[m][n]["seconds"] for n in lengths] for m in methods},
        "chunked_over_dense_peak": [rows["chunked"][n]["peak_mib"] / rows["dense"][n]["peak_mib"] for n in lengths],
        "growth_exponent": {m: _exponent({n: rows[m][n]["peak_mib"] for n in lengths}) for m in methods},
        # Same inputs in every process (seeded by L): the sums of the scores must agree.
        "checksum_rel_diff": {
            m: max(abs(rows[m][n]["checksum"] / rows["dense"][n]["checksum"] - 1) for n in lengths) for m in methods
        },
    }
    config = {
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "chunk_size": args.chunk_size,
        "dtype": "float32",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "measure": "cuda max_memory_allocated" if torch.cuda.is_available() else "VmHWM - VmRSS (fresh process)",
        "triton": "measured" if "triton" in methods else "skipped: no CUDA device",
    }
    path = write_result("lookm-scores", figures, config, args.out)
    _plot(path, lengths, figures["peak_mib"], figures["seconds"])
    print(f"wrote {path}")
    return 0


def _plot(path: Path, lengths: list[int], peaks: dict[str, list[float]], seconds: dict[str, list[float]]) -> None:
    from mmrag.benchmarks.common import plot_path, pyplot

    plt = pyplot()
    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, values, label in ((mem_ax, peaks, "peak extra memory (MiB)"), (time_ax, seconds, "seconds")):
        for method, series in values.items():
            ax.plot(lengths, series, marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt length L")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("LOOK-M score from Q and K")
    fig.tight_layout()
    fig.savefig(plot_path(path))
    plt.close(fig)


if __name__ == "__main__":
    method, *sizes = sys.argv[1:]
    print(json.dumps(_child(method, *(int(s) for s in sizes))))
