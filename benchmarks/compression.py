"""``mmrag bench compression``: the plugin's compression in vLLM against stock vLLM, measured in one run.

Workload: several fresh noise images per request (new seeds every time: no processor, encoder or prefix
cache hit) and a short question. The full run generates a random-weight LLaVA with 224-pixel images (256
visual tokens each) and an 8-layer, 512-wide text model, so that prefill and attention cost show on a CPU;
``--quick`` uses the default tiny LLaVA (16 visual tokens per image, 2 layers of 128), where everything is
fixed overhead.

Rows:

- ``stock``: vLLM's own ``LlavaForConditionalGeneration`` (no plugin), its own engine;
- ``aim@1``, ``aim@1/2``, ``aim@1/4``: the plugin's ``AimLlava`` on a second engine, the keep ratio set per
  request (``aim@1`` is the plugin's overhead: the prompt is stock's).

LOOK-M is not inside vLLM yet (issue 5), so it has no row: its KV figures exist only in the reference
engine (``mmrag bench fidelity`` / ``accuracy``).

Figures per row (medians over ``--rounds`` requests, ratios against ``stock``):

- ``ttft_ms``: one request at a time with ``max_tokens=1`` (preprocessing, vision tower, merge, prefill);
- ``decode_tokens_per_s``: one request at a time, ``(D - 1) / (t(D tokens) - t(1 token))`` with
  ``D = --decode-tokens`` forced (``ignore_eos``);
- ``kv_tokens_per_request``: prompt tokens + ``D``: the entries per layer the request holds in the cache;
- ``requests_in_kv_budget``: how many such requests fit ``--kv-budget-tokens`` of cache, counted in vLLM's
  blocks (derived from the counts above, not observed in the scheduler);
- ``throughput_tokens_per_s``: ``--concurrent`` requests submitted at once, generated tokens over wall time.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

HELP = "AIM in vLLM vs stock vLLM: time to first token, decode tokens/s, KV tokens per request, throughput."

AIM_RATIOS = {"aim@1": 1.0, "aim@1/2": 0.5, "aim@1/4": 0.25}
BLOCK_SIZE = 16  # vLLM's default KV block size on CPU


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=None, help="Images per request (default 8; quick 4).")
    parser.add_argument("--rounds", type=int, default=None, help="Measured requests per figure (default 8; quick 3).")
    parser.add_argument(
        "--decode-tokens", type=int, default=None, help="Tokens per decode request (default 32; quick 8)."
    )
    parser.add_argument(
        "--concurrent", type=int, default=None, help="Requests in the throughput run (default 8; quick 4)."
    )
    parser.add_argument("--kv-budget-tokens", type=int, default=65536, help="Cache size for requests_in_kv_budget.")


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


def _measure(workload: _Workload, ratio: float | None, rounds: int, decode: int, concurrent: int) -> dict[str, Any]:
    from vllm import SamplingParams

    first = SamplingParams(temperature=0.0, max_tokens=1)
    longer = SamplingParams(temperature=0.0, max_tokens=decode, ignore_eos=True)
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
        "kv_tokens_per_request": prompt_tokens + decode,
        "throughput_tokens_per_s": generated / wall,
    }


def _engine(path: Path, max_model_len: int, images: int, plugin: bool):
    from vllm import LLM

    overrides = {"architectures": ["AimLlavaForConditionalGeneration"], "aim_keep_ratio": 1.0} if plugin else None
    return LLM(
        model=str(path),
        enforce_eager=True,
        max_model_len=max_model_len,
        seed=0,
        limit_mm_per_prompt={"image": images},
        hf_overrides=overrides,
    )


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from mmrag.benchmarks.common import plot_path, write_result
    from mmrag.serving.models.tiny import TinyLlavaSpec, make_tiny_llava

    images = args.images or (4 if args.quick else 8)
    rounds = args.rounds or (3 if args.quick else 8)
    decode = args.decode_tokens or (8 if args.quick else 32)
    concurrent = args.concurrent or (4 if args.quick else 8)
    spec = TinyLlavaSpec() if args.quick else TinyLlavaSpec(image_size=224, text_hidden=512, text_layers=8)
    max_model_len = 256 + decode + images * spec.visual_tokens_per_image
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_llava(Path(tmp) / "llava", spec)
        for plugin in (False, True):
            llm = _engine(path, max_model_len, images, plugin)
            try:
                workload = _Workload(llm, images, spec.image_size)
                if not plugin:
                    rows["stock"] = _measure(workload, None, rounds, decode, concurrent)
                for name, ratio in AIM_RATIOS.items() if plugin else ():
                    rows[name] = _measure(workload, ratio, rounds, decode, concurrent)
            finally:
                llm.llm_engine.engine_core.shutdown()
    stock = rows["stock"]
    for row in rows.values():
        blocks = math.ceil(row["kv_tokens_per_request"] / BLOCK_SIZE)
        row["requests_in_kv_budget"] = args.kv_budget_tokens // BLOCK_SIZE // blocks
        row["vs_stock"] = {
            key: row[key] / stock[key]
            for key in ("ttft_ms", "decode_tokens_per_s", "kv_tokens_per_request", "throughput_tokens_per_s")
            if row[key] is not None and stock[key]
        }
        row["vs_stock"]["requests_in_kv_budget"] = row["requests_in_kv_budget"] / stock["requests_in_kv_budget"]
    config = {
        "images_per_request": images,
        "image_size": spec.image_size,
        "visual_tokens_per_image": spec.visual_tokens_per_image,
        "text_hidden": spec.text_hidden,
        "text_layers": spec.text_layers,
        "rounds": rounds,
        "decode_tokens": decode,
        "concurrent": concurrent,
        "kv_budget_tokens": args.kv_budget_tokens,
        "block_size": BLOCK_SIZE,
        "engine": "vllm offline LLM, enforce_eager, CPU; stock class and the plugin class on separate engines",
        "quick": bool(args.quick),
    }
    out = write_result("compression", {"rows": rows}, config, args.out)
    _plot(rows, plot_path(out))
    print(_table(rows))
    print(f"wrote {out} and {plot_path(out)}")
    return 0


def _table(rows: dict[str, dict[str, Any]]) -> str:
    keys = ("prompt_tokens", "ttft_ms", "decode_tokens_per_s", "requests_in_kv_budget", "throughput_tokens_per_s")
    lines = [f"{'row':8s} " + " ".join(f"{k:>24s}" for k in keys)]
    for name, row in rows.items():
        cells = []
        for key in keys:
            ratio = row["vs_stock"].get(key) if key != "prompt_tokens" else None
            value = row[key] if row[key] is not None else float("nan")
            cells.append(f"{value:14.1f}" + (f" (x{ratio:5.2f})" if ratio is not None else " " * 9))
        lines.append(f"{name:8s} " + " ".join(f"{c:>24s}" for c in cells))
    return "\n".join(lines)


def _plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    from mmrag.benchmarks.common import pyplot

    plt = pyplot()
    keys = (
        "ttft_ms",
        "decode_tokens_per_s",
        "kv_tokens_per_request",
        "requests_in_kv_budget",
        "throughput_tokens_per_s",
    )
    fig, axes = plt.subplots(1, len(keys), figsize=(16, 3.6))
    names = list(rows)
    for ax, key in zip(axes, keys, strict=True):
        ax.bar(names, [rows[n][key] or 0 for n in names], color=["black", "tab:gray", "tab:purple", "tab:blue"])
        ax.set_title(key.replace("_", " "), fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        for i, name in enumerate(names):
            ratio = rows[name]["vs_stock"].get(key)
            if ratio is not None:
                ax.annotate(f"x{ratio:.2f}", (i, 0), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7)
    fig.suptitle("AIM in vLLM vs stock vLLM (ratios vs stock, same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
