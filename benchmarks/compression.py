"""``mmrag bench compression``: the plugin's compression in vLLM against stock vLLM, measured in one run.

Workload: several fresh noise images per request (new seeds every time: no processor, encoder or prefix
cache hit) and a short question. The full run generates a random-weight LLaVA with 224-pixel images (256
visual tokens each) and an 8-layer, 512-wide text model, so that prefill and attention cost show on a CPU;
``--quick`` uses the default tiny LLaVA (16 visual tokens per image, 2 layers of 128), where everything is
fixed overhead.

Rows:

- ``stock``: vLLM's own ``LlavaForConditionalGeneration`` (no plugin), its own engine;
- ``aim@1``, ``aim@1/2``, ``aim@1/4``: the plugin's ``AimLlava`` on a second engine, the keep ratio set per
  request (``aim@1`` is the plugin's overhead: the prompt is stock's);
- ``lookm``, ``aim@1/4+lookm``: a third engine running LOOK-M at its default budget (heavy 0.1, recent
  0.1 of the prompt, pivotal merge; :mod:`mmrag.serving.vllm_plugin.kv`), without and with AIM 1/4.

Every engine has the same KV pool, ``--kv-budget-tokens`` in blocks of 32, and runs its engine core in
this process, so the scheduler can be read. Figures per row (medians over ``--rounds`` requests, ratios
against ``stock``):

- ``ttft_ms``: one request at a time with ``max_tokens=1`` (preprocessing, vision tower, merge, prefill,
  and LOOK-M's scoring and compaction);
- ``decode_tokens_per_s``: one request at a time, ``(D - 1) / (t(D tokens) - t(1 token))`` with
  ``D = --decode-tokens`` forced (``ignore_eos``);
- ``throughput_tokens_per_s``: ``--concurrent`` requests submitted at once, generated tokens over wall time;
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=None, help="Images per request (default 8; quick 4).")
    parser.add_argument("--rounds", type=int, default=None, help="Measured requests per figure (default 8; quick 3).")
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


class _Workload:
    """Fresh images per request, the same prompt text, one engine."""

    def __init__(self, llm, images: int, size: int):
        self.llm, self.images, self.size, self.seed = llm, images, size, 0
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

    def timed(self, ratio: float | None, params) -> tuple[float, Any]:
        prompt = self.prompt(ratio)
        start = time.perf_counter()
        (out,) = self.llm.generate([prompt], params, use_tqdm=False)
        return time.perf_counter() - start, out


def _params(max_tokens: int, kv: Any, **kwargs: Any):
    """Greedy sampling; on the KV-compaction engine the request names its method (``kv``)."""
    from vllm import SamplingParams

    from mmrag.serving.vllm_plugin.kv.plan import request_extra_args

    extra_args = request_extra_args(kv) if kv is not None else None
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra_args, **kwargs)


def _measure(workload: _Workload, ratio: float | None, kv: Any, args: argparse.Namespace) -> dict[str, Any]:
    rounds, decode, concurrent = args.rounds, args.decode_tokens, args.concurrent
    first = _params(1, kv)
    longer = _params(decode, kv, ignore_eos=True)
    workload.timed(ratio, first)  # warm-up: first-call allocations
    ttft, whole, prompt_tokens = [], [], 0
    for _ in range(rounds):
        seconds, out = workload.timed(ratio, first)
        ttft.append(seconds)
        prompt_tokens = len(out.prompt_token_ids)
        whole.append(workload.timed(ratio, longer)[0])
    prompts = [workload.prompt(ratio) for _ in range(concurrent)]
    start = time.perf_counter()
    outs = workload.llm.generate(prompts, longer, use_tqdm=False)
    wall = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    decode_s = statistics.median(whole) - statistics.median(ttft)
    return {
        "prompt_tokens": prompt_tokens,
        "ttft_ms": 1000 * statistics.median(ttft),
        "decode_tokens_per_s": (decode - 1) / decode_s if decode_s > 0 else None,
        "throughput_tokens_per_s": generated / wall,
        **_observe_capacity(workload, ratio, kv, args.capacity_requests, args.capacity_decode_tokens),
    }


def _observe_capacity(workload: _Workload, ratio: float | None, kv: Any, requests: int, decode: int) -> dict[str, Any]:
    """Submit ``requests`` at once; step the engine and read its scheduler after every step."""
    engine = workload.llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    offsets = getattr(scheduler, "_offsets", {})  # KVCompactionScheduler: logical - physical length
    params = _params(decode, kv, ignore_eos=True)
    for i in range(requests):
        engine.add_request(f"capacity-{workload.seed}-{i}", workload.prompt(ratio), params)
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


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from mmrag.benchmarks.common import plot_path, write_result
    from mmrag.kernels.methods import kv_method_as_dict
    from mmrag.serving.models.tiny import TinyLlavaSpec, make_tiny_llava

    _fill_defaults(args)
    spec = TinyLlavaSpec() if args.quick else TinyLlavaSpec(image_size=224, text_hidden=512, text_layers=8)
    decode = max(args.decode_tokens, args.capacity_decode_tokens)
    max_model_len = 256 + decode + args.images * spec.visual_tokens_per_image
    kv_none = {name: (ratio, None) for name, ratio in AIM_RATIOS.items()}
    groups = {"stock": {"stock": (None, None)}, "plugin": kv_none, "kv": kv_rows()}
    rows: dict[str, dict[str, Any]] = {}
    # In-process engine cores: the capacity run reads the scheduler.
    with _env("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_llava(Path(tmp) / "llava", spec)
        for kind, ratios in groups.items():
            llm = _engine(path, max_model_len, args.images, kind, args.kv_budget_tokens)
            try:
                workload = _Workload(llm, args.images, spec.image_size)
                for name, (ratio, kv) in ratios.items():
                    rows[name] = _measure(workload, ratio, kv, args)
            finally:
                llm.llm_engine.engine_core.shutdown()
                del llm
                gc.collect()
    stock = rows["stock"]
    for row in rows.values():
        row["vs_stock"] = {key: row[key] / stock[key] for key in _FIGURES if row[key] is not None and stock[key]}
    config = {
        "images_per_request": args.images,
        "image_size": spec.image_size,
        "visual_tokens_per_image": spec.visual_tokens_per_image,
        "text_hidden": spec.text_hidden,
        "text_layers": spec.text_layers,
        "rounds": args.rounds,
        "decode_tokens": args.decode_tokens,
        "concurrent": args.concurrent,
        "kv_budget_tokens": args.kv_budget_tokens,
        "capacity_requests": args.capacity_requests,
        "capacity_decode_tokens": args.capacity_decode_tokens,
        "block_size": BLOCK_SIZE,
        "kv_methods": {name: kv_method_as_dict(kv) for name, (_, kv) in kv_rows().items()},
        "engine": "vllm offline LLM, enforce_eager, CPU, engine core in process; stock, plugin and plugin+KV "
        "compaction (each KV method chosen per request) on separate engines with the same KV pool",
        "quick": bool(args.quick),
    }
    out = write_result("compression", {"rows": rows}, config, args.out)
    _plot(rows, plot_path(out))
    print(_table(rows))
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
    lines = [f"{'row':14s} " + " ".join(f"{k:>24s}" for k in keys)]
    for name, row in rows.items():
        cells = []
        for key in keys:
            ratio = row["vs_stock"].get(key) if key != "prompt_tokens" else None
            value = row[key] if row[key] is not None else float("nan")
            cells.append(f"{value:14.1f}" + (f" (x{ratio:5.2f})" if ratio is not None else " " * 9))
        lines.append(f"{name:14s} " + " ".join(f"{c:>24s}" for c in cells))
    return "\n".join(lines)


def _plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    from mmrag.benchmarks.common import pyplot

    plt = pyplot()
    keys = _FIGURES
    fig, axes = plt.subplots(1, len(keys), figsize=(18, 3.8))
    names = list(rows)
    for ax, key in zip(axes, keys, strict=True):
        colours = ["black", "tab:gray", "tab:purple", "tab:blue", "tab:orange", "tab:red"]
        ax.bar(names, [rows[n][key] or 0 for n in names], color=colours[: len(names)])
        ax.set_title(key.replace("_", " "), fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=45)
        for i, name in enumerate(names):
            ratio = rows[name]["vs_stock"].get(key)
            if ratio is not None:
                ax.annotate(f"x{ratio:.2f}", (i, 0), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7)
    fig.suptitle("AIM and LOOK-M in vLLM vs stock vLLM (ratios vs stock, same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
