"""AIM stage (a) in vLLM: prompt tokens and time to first token at keep ratios 1, 1/2, 1/4.

One offline vLLM engine serves the plugin model (``AimLlava``, which at ratio 1 is stock vLLM: see
``tests/vllm_plugin``); each ratio is a per-request ``mm_processor_kwargs`` value, so every ratio is
measured in the same run, on the same engine, interleaved round by round. Each request carries several
fresh noise images (new seeds every time: no processor, encoder or prefix cache hit) and asks for one
token, so its wall time is the time to first token: image preprocessing, vision tower, merge and prefill.
Figures are medians, and ratios against ratio 1.

``--quick`` runs the tiny LLaVA itself (56-pixel images, 16 visual tokens each, 2 text layers of width
128): its time to first token is fixed overhead. The full run generates the same random-weight LLaVA
with 224-pixel images (256 visual tokens each) and a larger text model (8 layers, width 512), so that
the prefill cost shows on a CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

HELP = "AIM in vLLM: prompt tokens and time to first token at keep ratios 1, 1/2, 1/4 (several images)."

RATIOS = (1.0, 0.5, 0.25)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=None, help="Images per request (default 8; quick 4).")
    parser.add_argument("--image-size", type=int, default=None, help="Image side in pixels (default 224; quick 56).")
    parser.add_argument("--text-hidden", type=int, default=None, help="LLM hidden size (default 512; quick 128).")
    parser.add_argument("--text-layers", type=int, default=None, help="LLM layers (default 8; quick 2).")
    parser.add_argument("--rounds", type=int, default=None, help="Measured requests per ratio (default 10; quick 4).")


def _noise_image(seed: int, size: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from mmrag.benchmarks.common import write_result
    from mmrag.serving.models.tiny import TinyLlavaSpec, make_tiny_llava

    images = args.images or (4 if args.quick else 8)
    size = args.image_size or (56 if args.quick else 224)
    rounds = args.rounds or (4 if args.quick else 10)
    text_hidden = args.text_hidden or (128 if args.quick else 512)
    text_layers = args.text_layers or (2 if args.quick else 8)
    spec = TinyLlavaSpec(image_size=size, text_hidden=text_hidden, text_layers=text_layers)
    text = "USER: " + "<image>\n" * images + "Compare these pictures in detail.\nASSISTANT:"
    max_model_len = 256 + images * spec.visual_tokens_per_image

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_llava(Path(tmp) / "tiny-llava", spec)
        llm = LLM(
            model=str(path),
            enforce_eager=True,
            max_model_len=max_model_len,
            seed=0,
            limit_mm_per_prompt={"image": images},
            hf_overrides={"architectures": ["AimLlavaForConditionalGeneration"], "aim_keep_ratio": 1.0},
        )
        params = SamplingParams(temperature=0.0, max_tokens=1)
        seed = 0

        def request(ratio: float) -> tuple[int, float]:
            nonlocal seed
            batch = [_noise_image(seed + i, size) for i in range(images)]
            seed += images
            prompt = {
                "prompt": text,
                "multi_modal_data": {"image": batch},
                "mm_processor_kwargs": {"aim_keep_ratio": ratio},
            }
            start = time.perf_counter()
            (out,) = llm.generate([prompt], params, use_tqdm=False)
            return len(out.prompt_token_ids), time.perf_counter() - start

        for ratio in RATIOS:  # warm-up: first-call allocations and lazy imports
            request(ratio)
        tokens: dict[float, int] = {}
        ttft: dict[float, list[float]] = {r: [] for r in RATIOS}
        for _ in range(rounds):
            for ratio in RATIOS:
                tokens[ratio], seconds = request(ratio)
                ttft[ratio].append(seconds)
        llm.llm_engine.engine_core.shutdown()

    base_tokens, base_ttft = tokens[1.0], statistics.median(ttft[1.0])
    rows: list[dict[str, Any]] = []
    for ratio in RATIOS:
        median = statistics.median(ttft[ratio])
        rows.append(
            {
                "keep_ratio": ratio,
                "prompt_tokens": tokens[ratio],
                "visual_tokens": tokens[ratio] - (base_tokens - images * spec.visual_tokens_per_image),
                "ttft_ms_median": round(1000 * median, 2),
                "ttft_ms_min": round(1000 * min(ttft[ratio]), 2),
                "prompt_tokens_vs_ratio_1": round(tokens[ratio] / base_tokens, 4),
                "ttft_vs_ratio_1": round(median / base_ttft, 4),
            }
        )
    figures = {"per_ratio": rows}
    config = {
        "images_per_request": images,
        "image_size": size,
        "visual_tokens_per_image": spec.visual_tokens_per_image,
        "rounds": rounds,
        "text_hidden": text_hidden,
        "text_layers": text_layers,
        "model": "generated random-weight LLaVA (CLIP 2 layers, hidden 128; Llama text as above), served as "
        "AimLlava by the mmrag vLLM plugin",
        "engine": "vllm offline LLM, enforce_eager, CPU",
        "quick": bool(args.quick),
    }
    out = write_result("aim-vllm", figures, config, args.out)
    for row in rows:
        print(row)
    print(f"wrote {out}")
    _plot(out, rows)
    return 0


def _plot(path: Path, rows: list[dict[str, Any]]) -> None:
    from mmrag.benchmarks.common import pyplot

    plt = pyplot()
    from mmrag.benchmarks.common import plot_path

    labels = [f"{row['keep_ratio']:g}" for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.bar(labels, [row["prompt_tokens"] for row in rows], color="tab:blue")
    left.set(xlabel="AIM keep ratio", ylabel="prompt tokens", title="Prompt tokens")
    right.bar(labels, [row["ttft_ms_median"] for row in rows], color="tab:orange")
    right.set(xlabel="AIM keep ratio", ylabel="ms (median)", title="Time to first token")
    for ax, key in ((left, "prompt_tokens_vs_ratio_1"), (right, "ttft_vs_ratio_1")):
        for i, row in enumerate(rows):
            ax.annotate(f"{row[key]:.2f}x", (i, 0), textcoords="offset points", xytext=(0, 4), ha="center")
    fig.tight_layout()
    fig.savefig(plot_path(path))
    plt.close(fig)
