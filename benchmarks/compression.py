"""``mmrag bench compression``: the plugin's compression in vLLM against stock vLLM, measured in one run.

Workload: several fresh noise images per request (new seeds every time: no processor, encoder or prefix
cache hit) and a short question. The full run generates a random-weight LLaVA with 224-pixel images (256
visual tokens each) and an 8-layer, 512-wide text model, so that prefill and attention cost show on a CPU;
``--quick`` uses the default tiny LLaVA (16 visual tokens per image, 2 layers of 128), where everything is
fixed overhead.

Rows:

- ``stock``: vLLM's own ``LlavaForConditionalGeneration`` (no plugin), its own engine;
- ``aim@1``, ``aim@1/2``, ``aim@1/4``: the plugin's ``AimLlava`` on a second engine, the keep ratio set per
  request (``aim@1`` is the plugin's overhead: the prompt is stock's, so it should come out near 1.0x);
- ``lookm``, ``random``, ..., ``aim@1/4+lookm``: a third engine compacting KV caches, every registered KV
  method at its default settings chosen per request (:mod:`mmrag.serving.vllm_plugin.kv`), and LOOK-M
  behind AIM 1/4.

Every engine has the same KV pool, ``--kv-budget-tokens`` in blocks of 32, and runs its engine core in
this process, so the scheduler can be read; the three engines are alive at once (they share the process,
its threads and its memory, which the tiny models leave room for).

Method, so that no row gains from its place in the run: each row is first warmed with ``--warmup``
time-to-first-token and decode requests and one throughput batch; then ``--rounds`` rounds each visit
every row once, in an order shuffled with ``--seed`` (stock is not always first), and take that row's
timed samples of the round. The timed figures are medians across rounds, with min, max and every sample
under ``spread``; ratios against ``stock`` are of the medians. The scheduler counts (capacity, KV entries)
are not timings: they are observed once per row after the rounds, rows again in a shuffled order.

- ``ttft_ms``: one request at a time with ``max_tokens=1`` (preprocessing, vision tower, merge, prefill,
  and LOOK-M's scoring and compaction);
- ``decode_tokens_per_s``: per round, ``(D - 1) / (t(D tokens) - t(1 token))`` with ``D = --decode-tokens``
  forced (``ignore_eos``), the two requests one after the other in the same round (a round where the
  difference is not positive gives no sample);
- ``throughput_tokens_per_s``: per round, ``--concurrent`` requests of ``D`` tokens submitted at once,
  generated tokens over wall time;
- ``requests_in_kv_budget``: observed in the scheduler: ``--capacity-requests`` requests of
  ``--capacity-decode-tokens`` tokens each submitted at once into the pool; the most that were decoding at
  the same time (past their prefill, so each holding its whole prompt's cache, compacted or not; requests
  still in a chunked prefill hold part of it and are not counted);
- ``kv_tokens_per_request``: observed in the same run: the physical cache entries per layer a request
  holds at its last step (prompt entries kept + generated tokens), median over requests.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HELP = "AIM and LOOK-M in vLLM vs stock vLLM: TTFT, decode tokens/s, KV tokens per request, capacity, throughput."

AIM_RATIOS = {"aim@1": 1.0, "aim@1/2": 0.5, "aim@1/4": 0.25}


def kv_rows() -> dict[str, tuple[float, Any]]:
    """Row name -> (AIM ratio, KV method): every registered KV method at its default settings, served per
    request by one KV-compaction engine, and LOOK-M behind AIM 1/4."""
    from mmrag.kernels.methods import KV_METHODS, make_kv_method

    rows = {name: (1.0, make_kv_method(name)) for name in KV_METHODS}
    return {**rows, "aim@1/4+lookm": (0.25, make_kv_method("lookm"))}


BLOCK_SIZE = 32  # the CPU attention kernel's block sizes are multiples of 32

# Timed per round (median, min, max across rounds); the rest are scheduler counts, observed once per row.
TIMED = ("ttft_ms", "decode_tokens_per_s", "throughput_tokens_per_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=None, help="Images per request (default 8; quick 4).")
    parser.add_argument(
        "--rounds", type=int, default=None, help="Rounds; each visits every row once (default 8; quick 3)."
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="Warm-up requests of each kind per row (default 3; quick 2)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Shuffles the row order of each round.")
    parser.add_argument(
        "--decode-tokens", type=int, default=None, help="Tokens per decode request (default 32; quick 8)."
    )
    parser.add_argument(
        "--concurrent", type=int, default=None, help="Requests in the throughput run (default 8; quick 4)."
    )
    parser.add_argument(
        "--kv-budget-tokens", type=int, default=None, help="Every engine's KV pool (default 16384; quick 1024)."
    )
    parser.add_argument(
        "--capacity-requests", type=int, default=None, help="Requests in the capacity run (default 48; quick 16)."
    )
    parser.add_argument(
        "--capacity-decode-tokens", type=int, default=None, help="Tokens per capacity request (default 64; quick 16)."
    )


class _Images:
    """Prompts with fresh noise images (one seed counter for every engine) and the same text."""

    def __init__(self, images: int, size: int):
        self.images, self.size, self.seed = images, size, 0
        self.text = "USER: " + "<image>\n" * images + "Compare these pictures in detail.\nASSISTANT:"

    def prompt(self, ratio: float | None) -> dict[str, Any]:
        import numpy as np
        from PIL import Image

        batch = [
            Image.fromarray(np.random.default_rng(self.seed + i).integers(0, 256, (self.size, self.size, 3), np.uint8))
            for i in range(self.images)
        ]
        self.seed += self.images
        prompt: dict[str, Any] = {"prompt": self.text, "multi_modal_data": {"image": batch}}
        if ratio is not None:
            prompt["mm_processor_kwargs"] = {"aim_keep_ratio": ratio}
        return prompt


@dataclass
class _Row:
    """One row: the engine serving it, its AIM keep ratio (None on stock) and KV method (None: no compaction)."""

    llm: Any
    ratio: float | None
    kv: Any
    images: _Images

    def timed(self, params, requests: int = 1) -> tuple[float, list[Any]]:
        """Seconds for ``requests`` fresh prompts submitted at once (images made before the clock starts)."""
        prompts = [self.images.prompt(self.ratio) for _ in range(requests)]
        start = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start, outs


def _params(max_tokens: int, kv: Any, **kwargs: Any):
    """Greedy sampling; on the KV-compaction engine the request names its method (``kv``)."""
    from vllm import SamplingParams

    from mmrag.serving.vllm_plugin.kv.plan import request_extra_args

    extra_args = request_extra_args(kv) if kv is not None else None
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra_args, **kwargs)


def _warm(row: _Row, args: argparse.Namespace) -> None:
    """First-call allocations and shapes: ``--warmup`` requests of each timed kind and one throughput batch."""
    first, longer = _params(1, row.kv), _params(args.decode_tokens, row.kv, ignore_eos=True)
    for _ in range(args.warmup):
        row.timed(first)
        row.timed(longer)
    row.timed(longer, args.concurrent)


def _sample(row: _Row, args: argparse.Namespace) -> dict[str, Any]:
    """One round's timed samples of one row."""
    decode = args.decode_tokens
    longer = _params(decode, row.kv, ignore_eos=True)
    ttft, (out,) = row.timed(_params(1, row.kv))
    whole, _ = row.timed(longer)
    wall, outs = row.timed(longer, args.concurrent)
    return {
        "prompt_tokens": len(out.prompt_token_ids),
        "ttft_ms": 1000 * ttft,
        "decode_tokens_per_s": (decode - 1) / (whole - ttft) if whole > ttft else None,
        "throughput_tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outs) / wall,
    }


def _summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per timed figure the median across rounds (the row's figure) and its spread."""
    from mmrag.benchmarks.common import spread

    row: dict[str, Any] = {"prompt_tokens": samples[-1]["prompt_tokens"], "spread": {}}
    for key in TIMED:
        values = [s[key] for s in samples if s[key] is not None]
        summary = spread(values) or {"median": None, "min": None, "max": None}
        row[key] = summary["median"]
        row["spread"][key] = {**summary, "samples": [s[key] for s in samples]}
    return row


def _observe_capacity(row: _Row, requests: int, decode: int) -> dict[str, Any]:
    """Submit ``requests`` at once; step the engine and read its scheduler after every step."""
    engine = row.llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    offsets = getattr(scheduler, "_offsets", {})  # KVCompactionScheduler: logical - physical length
    params = _params(decode, row.kv, ignore_eos=True)
    for i in range(requests):
        engine.add_request(f"capacity-{row.images.seed}-{i}", row.images.prompt(row.ratio), params)
    peak, seen, known_offsets = 0, {}, {}
    while engine.has_unfinished_requests():
        engine.step()
        # Requests past their prefill: each holds its whole prompt's KV (compacted or not) at once.
        peak = max(peak, sum(request.num_output_tokens > 0 for request in scheduler.running))
        seen.update((request.request_id, request) for request in scheduler.running)
        known_offsets.update(offsets)  # a finished request's offset is dropped with it
    # Finished requests keep their last counts: the prompt and every generated token but the last.
    physical = [request.num_computed_tokens - known_offsets.get(rid, 0) for rid, request in seen.items()]
    return {"requests_in_kv_budget": peak, "kv_tokens_per_request": statistics.median(physical)}


def _engine(path: Path, max_model_len: int, images: int, kind: str, kv_budget_tokens: int):
    """Stock vLLM, the AIM plugin, or the plugin with KV compaction: the server's engine arguments for each."""
    from vllm import LLM

    from mmrag.serving.config import MmragConfig
    from mmrag.serving.engine.args import engine_kwargs

    config = MmragConfig.model_validate(
        {
            "engine": {
                "max_model_len": max_model_len,
                "engine_kwargs": {"block_size": BLOCK_SIZE, "num_gpu_blocks_override": kv_budget_tokens // BLOCK_SIZE},
            },
            "limits": {"max_images_per_request": images},
            "compression": {"aim_plugin": kind != "stock", "lookm": {"enabled": kind == "kv"}},
        }
    )
    return LLM(**engine_kwargs(config, str(path)))


def measure(rows: dict[str, _Row], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Warm every row, then ``--rounds`` rounds over every row in a shuffled order; counts last."""
    from mmrag.benchmarks.common import shuffled_rounds

    started = time.perf_counter()
    for row in rows.values():
        _warm(row, args)
    print(f"warm-up done in {time.perf_counter() - started:.0f} s", flush=True)
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in rows}
    *orders, counting_order = shuffled_rounds(list(rows), args.rounds + 1, args.seed)
    for index, order in enumerate(orders):
        for name in order:
            samples[name].append(_sample(rows[name], args))
        print(f"round {index + 1}/{args.rounds} done at {time.perf_counter() - started:.0f} s: {order}", flush=True)
    figures = {name: _summary(samples[name]) for name in rows}
    for name in counting_order:
        figures[name].update(_observe_capacity(rows[name], args.capacity_requests, args.capacity_decode_tokens))
    stock = figures["stock"]
    for row in figures.values():
        row["vs_stock"] = {key: row[key] / stock[key] for key in _FIGURES if row[key] is not None and stock[key]}
    return {"rows": {name: figures[name] for name in rows}, "orders": orders}


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from mmrag.benchmarks.common import plot_path, write_result
    from mmrag.kernels.methods import kv_method_as_dict
    from mmrag.serving.models.tiny import TinyLlavaSpec, make_tiny_llava

    _fill_defaults(args)
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    spec = TinyLlavaSpec() if args.quick else TinyLlavaSpec(image_size=224, text_hidden=512, text_layers=8)
    decode = max(args.decode_tokens, args.capacity_decode_tokens)
    max_model_len = 256 + decode + args.images * spec.visual_tokens_per_image
    groups: dict[str, dict[str, tuple[float | None, Any]]] = {
        "stock": {"stock": (None, None)},
        "plugin": {name: (ratio, None) for name, ratio in AIM_RATIOS.items()},
        "kv": kv_rows(),
    }
    images = _Images(args.images, spec.image_size)
    engines: list[Any] = []
    # In-process engine cores: the capacity run reads the scheduler. All three engines live at once, so
    # that every round can visit every row.
    with _env("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_llava(Path(tmp) / "llava", spec)
        try:
            rows: dict[str, _Row] = {}
            for kind, group in groups.items():
                engines.append(_engine(path, max_model_len, args.images, kind, args.kv_budget_tokens))
                rows.update({name: _Row(engines[-1], ratio, kv, images) for name, (ratio, kv) in group.items()})
            figures = measure(rows, args)
        finally:
            for llm in engines:
                llm.llm_engine.engine_core.shutdown()
            engines.clear()
            gc.collect()
    config = {
        "images_per_request": args.images,
        "image_size": spec.image_size,
        "visual_tokens_per_image": spec.visual_tokens_per_image,
        "text_hidden": spec.text_hidden,
        "text_layers": spec.text_layers,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "seed": args.seed,
        "decode_tokens": args.decode_tokens,
        "concurrent": args.concurrent,
        "kv_budget_tokens": args.kv_budget_tokens,
        "capacity_requests": args.capacity_requests,
        "capacity_decode_tokens": args.capacity_decode_tokens,
        "block_size": BLOCK_SIZE,
        "kv_methods": {name: kv_method_as_dict(kv) for name, (_, kv) in kv_rows().items()},
        "engine": "vllm offline LLM, enforce_eager, CPU, engine core in process; stock, plugin and plugin+KV "
        "compaction (each KV method chosen per request) on separate engines with the same KV pool, alive at once",
        "method": "per row --warmup requests of each kind and one throughput batch; then --rounds rounds, each "
        "visiting every row in an order shuffled with --seed; timed figures are medians across rounds "
        "(spread: min, max, samples), ratios of medians; scheduler counts observed once per row after the rounds",
        "load_average_at_start": load_at_start,
        "wall_s": round(time.perf_counter() - started, 1),
        "quick": bool(args.quick),
    }
    out = write_result("compression", figures, config, args.out)
    _plot(figures["rows"], plot_path(out), args.rounds)
    print(_table(figures["rows"]))
    print(f"wrote {out} and {plot_path(out)}")
    return 0


_FIGURES = (
    "ttft_ms",
    "decode_tokens_per_s",
    "kv_tokens_per_request",
    "requests_in_kv_budget",
    "throughput_tokens_per_s",
)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _fill_defaults(args: argparse.Namespace) -> None:
    quick = bool(args.quick)
    defaults = {
        "images": (8, 4),
        "rounds": (8, 3),
        "warmup": (3, 2),
        "decode_tokens": (32, 8),
        "concurrent": (8, 4),
        "kv_budget_tokens": (16384, 1024),
        "capacity_requests": (48, 16),
        "capacity_decode_tokens": (64, 16),
    }
    for name, (full, short) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)


def _table(rows: dict[str, dict[str, Any]]) -> str:
    keys = ("prompt_tokens", "ttft_ms", "decode_tokens_per_s", "requests_in_kv_budget", "throughput_tokens_per_s")
    lines = [f"{'row':14s} " + " ".join(f"{k:>34s}" for k in keys)]
    for name, row in rows.items():
        cells = []
        for key in keys:
            ratio = row["vs_stock"].get(key) if key != "prompt_tokens" else None
            value = row[key] if row[key] is not None else float("nan")
            cell = f"{value:.1f}" + (f" (x{ratio:.2f})" if ratio is not None else "")
            spread = row["spread"].get(key)
            if spread and spread["min"] is not None:
                cell += f" [{spread['min']:.1f}-{spread['max']:.1f}]"
            cells.append(cell)
        lines.append(f"{name:14s} " + " ".join(f"{c:>34s}" for c in cells))
    return "\n".join(lines)


def _plot(rows: dict[str, dict[str, Any]], path: Path, rounds: int) -> None:
    from mmrag.benchmarks.common import pyplot

    plt = pyplot()
    keys = _FIGURES
    fig, axes = plt.subplots(1, len(keys), figsize=(18, 3.8))
    names = list(rows)
    colours = ["black", "tab:gray", "tab:purple", "tab:blue", "tab:orange", "tab:red", "tab:green", "tab:brown"]
    for ax, key in zip(axes, keys, strict=True):
        heights = [rows[n][key] or 0 for n in names]
        errors = None
        if key in TIMED:  # bars from min to max across rounds
            spreads = [rows[n]["spread"][key] for n in names]
            errors = [
                [h - (s["min"] if s["min"] is not None else h) for h, s in zip(heights, spreads, strict=True)],
                [(s["max"] if s["max"] is not None else h) - h for h, s in zip(heights, spreads, strict=True)],
            ]
        ax.bar(names, heights, yerr=errors, capsize=2, color=[colours[i % len(colours)] for i in range(len(names))])
        ax.set_title(key.replace("_", " "), fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=45)
        for i, name in enumerate(names):
            ratio = rows[name]["vs_stock"].get(key)
            if ratio is not None:
                ax.annotate(f"x{ratio:.2f}", (i, 0), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7)
    fig.suptitle(
        f"AIM and LOOK-M in vLLM vs stock vLLM: ratios of medians over {rounds} interleaved rounds "
        "(bars: min-max), counts observed once"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
