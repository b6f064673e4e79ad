"""``mmrag bench fidelity``: what AIM and LOOK-M cost in fidelity and save in compute, against the full context.

Every method and budget of :func:`mmrag.kernels.reference.fidelity.default_grid` (AIM merge ratios, AIM
pruning, the two stacked, LOOK-M's three merges and plain eviction at the default budget, pivotal at two
larger budgets), plus ``full`` (no method: the baseline, compared with itself), runs in the reference engine
on the same multi-image prompts. The measures are :func:`~mmrag.kernels.reference.fidelity.evaluate`'s,
means over the prompts, each against the full context measured in the same run:

- ``top1_agreement``: share of the full engine's greedy tokens the method also ranks first (teacher forced);
- ``mean_kl``: mean ``KL(p_full || p_method)`` of the next-token distributions, nats;
- ``kv_ratio``: prompt KV entries kept over the full cache's;
- ``prefill_flops`` / ``flops_ratio``: analytic, as AIM counts them (each layer at the tokens it sees);
- ``peak_mib`` / ``peak_ratio``: peak memory of one ``generate`` (prefill + decoding), below.

**The model has random weights** (the tiny LLaVA of :mod:`mmrag.serving.models.tiny`; a trained model is
another issue): agreement and KL here check the plumbing (each method runs, keeps what its budget says,
and the answer moves by a measurable amount), they are not accuracy claims. Two variants run: ``random``
(the weights as generated, whose attention is near uniform) and ``peaky`` (the tests' variant: query and
key weights x8, so attention has something to rank).

Peak memory: the torch profiler's memory events (every CPU tensor allocation and free, in order) during
one ``generate`` of the method on each prompt; the figure is the highest sum of live tensor bytes above
what was live at the start (weights and inputs excluded), the maximum over prompts. Why not the others:
``tracemalloc`` sees only Python's allocator, not torch's tensors; a fresh process per method read through
``VmHWM`` (as ``lookm-scores`` does; not tried here) costs an interpreter and a torch import per method, and
these prompts' tensors (tens to hundreds of KiB) would mostly come from heap pages already resident, so the
high-water mark would barely move. The profiler count is exact and deterministic, but it counts tensor
storage only (no allocator slack, no Python objects).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HELP = "AIM and LOOK-M vs the full context (tiny random LLaVA): top-1 agreement, KL, KV kept, FLOPs, peak memory."

# Images per prompt: 16 visual tokens each, so the image share of the prompt grows with the count.
DEFAULT_IMAGES = (2, 4, 6, 8, 12, 16)
QUICK_IMAGES = (4, 10)
DEFAULT_NEW_TOKENS = 32
QUICK_NEW_TOKENS = 8
VARIANTS = ("random", "peaky")
PEAKY_QK_SCALE = 8.0
# Short: the tokenizer is byte-level, and LOOK-M's budgets only differ once text is a small share.
QUESTIONS = ("Which is brightest?", "What changes?", "Count red areas.", "Which two match?")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images", default=None, help="Comma-separated images per prompt, one prompt each (default 2,4,6,8,12,16)."
    )
    parser.add_argument("--new-tokens", type=int, default=None, help="Greedy tokens per prompt (default 32).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the tiny model and the images (default 0).")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="random, peaky or both (default both).")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1).")


def _image(seed: int, blocks: int):
    """A 56x56 image of ``blocks x blocks`` flat colour regions plus a little noise.

    Flat regions give neighbouring patches similar features, as in photographs, so a token merge has
    something to merge; the noise keeps no two patches identical.
    """
    import torch
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 256, (3, blocks, blocks), generator=gen).float()
    pixels = torch.nn.functional.interpolate(colours[None], size=(56, 56), mode="nearest")[0]
    pixels = (pixels + 12 * torch.randn(pixels.shape, generator=gen)).clamp(0, 255)
    return Image.fromarray(pixels.permute(1, 2, 0).to(torch.uint8).numpy())


def build_prompts(processor: Any, image_counts: list[int], seed: int) -> list[dict[str, Any]]:
    """One chat prompt per count: the images, then a short question."""
    prompts = []
    for index, count in enumerate(image_counts):
        content: list[dict[str, str]] = [{"type": "image"}] * count
        images = [_image(seed * 1000 + index * 100 + i, blocks=(2, 4, 7)[i % 3]) for i in range(count)]
        content.append({"type": "text", "text": QUESTIONS[index % len(QUESTIONS)]})
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        batch = processor(text=text, images=images, return_tensors="pt")
        prompts.append({"images": count, "input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"]})
    return prompts


def load_model(model_dir: Path, variant: str) -> Any:
    """The tiny LLaVA in float32 with eager attention; ``peaky``: LLM query and key weights x8."""
    import torch
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    if variant == "peaky":
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                layer.self_attn.q_proj.weight.mul_(PEAKY_QK_SCALE)
                layer.self_attn.k_proj.weight.mul_(PEAKY_QK_SCALE)
    elif variant != "random":
        raise ValueError(f"unknown variant {variant!r} (random, peaky)")
    return model


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: Kineto (behind the profiler) logs each start and stop there,
    from C++, and ignores ``KINETO_LOG_LEVEL`` set after the process started. Exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn: Any) -> int:
    """Highest sum of live CPU tensor bytes allocated during ``fn()`` above those live before it."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def _methods_config(grid: dict[str, Any]) -> dict[str, str]:
    return {name: repr(methods) for name, methods in grid.items()}


def _measure(
    model_dir: Path, prompts: list[dict[str, Any]], variants: list[str], new_tokens: int
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, Any]]:
    """Per variant, the :func:`evaluate` table of ``full`` + the default grid, with peak memory added."""
    from mmrag.kernels.reference.engine import ReferenceEngine, ReferenceMethods
    from mmrag.kernels.reference.fidelity import default_grid, evaluate

    pairs = [(p["input_ids"], p["pixel_values"]) for p in prompts]
    tables: dict[str, dict[str, dict[str, float]]] = {}
    grid: dict[str, Any] = {}
    for variant in variants:
        model = load_model(model_dir, variant)
        grid = {"full": ReferenceMethods(), **default_grid(model.config.text_config.num_hidden_layers)}
        variant_start = time.perf_counter()
        table = evaluate(model, pairs, grid, max_new_tokens=new_tokens)
        for name, methods in grid.items():
            engine = ReferenceEngine(model, methods)
            peaks = [peak_bytes(lambda e=engine, p=pair: e.generate(*p, new_tokens)) for pair in pairs]
            table[name]["peak_mib"] = max(peaks) / 2**20
        full_peak = table["full"]["peak_mib"]
        for row in table.values():
            row["peak_ratio"] = row["peak_mib"] / full_peak
        tables[variant] = table
        print(f"-- {variant} ({time.perf_counter() - variant_start:.1f} s)", flush=True)
        _print_table(table)
    return tables, grid


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoProcessor

    from mmrag.benchmarks.common import write_result
    from mmrag.serving.models.tiny import TinyLlavaSpec, make_tiny_llava

    if args.images:
        image_counts = [int(x) for x in args.images.split(",")]
    else:
        image_counts = list(QUICK_IMAGES if args.quick else DEFAULT_IMAGES)
    new_tokens = args.new_tokens or (QUICK_NEW_TOKENS if args.quick else DEFAULT_NEW_TOKENS)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    spec = TinyLlavaSpec(seed=args.seed)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    # The tensors are tiny: intra-op threads only add synchronisation, and on a shared machine their
    # spin-waits made the run several times slower. Restored afterwards (the test runs in-process).
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="mmrag-fidelity-") as tmp:
            model_dir = make_tiny_llava(Path(tmp) / "tiny-llava", spec)
            processor = AutoProcessor.from_pretrained(model_dir)
            prompts = build_prompts(processor, image_counts, args.seed)
            tables, grid = _measure(model_dir, prompts, variants, new_tokens)
    finally:
        torch.set_num_threads(threads)

    figures: dict[str, Any] = {"variants": tables, "methods": list(grid)}
    figures["prompts"] = [{"images": p["images"], "prompt_len": int(p["input_ids"].shape[1])} for p in prompts]
    config = {
        "model": (
            f"tiny LLaVA (mmrag.serving.models.tiny, seed {spec.seed}): CLIP {spec.vision_layers} layers + "
            f"Llama {spec.text_layers} layers, hidden {spec.text_hidden}, head_dim {spec.head_dim}, "
            f"{spec.visual_tokens_per_image} visual tokens per image; float32, eager attention, CPU"
        ),
        "weights": "random",
        "note": (
            "RANDOM-WEIGHT model (a trained model is another issue): top-1 agreement and KL are plumbing "
            "checks (every method runs against the full context on the same prompts and moves the answer "
            "by a measurable amount), not accuracy claims. kv_ratio, flops_ratio and peak memory do not "
            "depend on the weights' quality."
        ),
        "variants": {
            "random": "weights as generated: near-uniform attention",
            "peaky": f"LLM q_proj and k_proj weights x{PEAKY_QK_SCALE:g} (the tests' peaky_llava)",
        },
        "prompts": "chat prompts of N 56x56 block-colour images + a short question",
        "image_counts": image_counts,
        "max_new_tokens": new_tokens,
        "baseline": "full: the reference engine with no method, same prompts, same run (compared with itself)",
        "grid": _methods_config(grid),
        "aggregation": "mean over prompts; peak_mib: max over prompts, peak_ratio = peak_mib / full's",
        "flops": "analytic prefill matmul FLOPs as AIM counts them (serving.reference.fidelity.prefill_flops)",
        "peak_memory": (
            "torch profiler memory events (CPU tensor allocations and frees) during one generate(prompt, "
            "max_new_tokens) of the method: highest live tensor bytes above the start (weights and inputs "
            "excluded); tensor storage only, no allocator slack"
        ),
        "torch_threads": args.threads,
        "quick": bool(args.quick),
        "seconds": round(time.perf_counter() - started, 1),
    }
    path = write_result("fidelity", figures, config, args.out)
    _plot(path, figures)
    print(f"wrote {path}")
    return 0


_COLUMNS = (
    ("top1_agreement", "top1", "{:6.3f}"),
    ("mean_kl", "mean_kl", "{:9.2e}"),
    ("kv_ratio", "kv", "{:6.3f}"),
    ("flops_ratio", "flops", "{:6.3f}"),
    ("peak_mib", "peak_MiB", "{:8.3f}"),
    ("peak_ratio", "peak", "{:6.3f}"),
)


def _print_table(table: dict[str, dict[str, float]]) -> None:
    print(f"{'method':22s} " + " ".join(f"{title:>{len(fmt.format(0.0))}s}" for _, title, fmt in _COLUMNS))
    for name, row in table.items():
        print(f"{name:22s} " + " ".join(fmt.format(row[key]) for key, _, fmt in _COLUMNS), flush=True)


def _plot(path: Path, figures: dict[str, Any]) -> None:
    from mmrag.benchmarks.common import pyplot

    plt = pyplot()
    import numpy as np

    from mmrag.benchmarks.common import plot_path

    methods = figures["methods"]
    variants = list(figures["variants"])
    x = np.arange(len(methods))
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))

    ax = axes[0]
    width = 0.8 / max(len(variants), 1)
    for i, variant in enumerate(variants):
        values = [figures["variants"][variant][m]["top1_agreement"] for m in methods]
        ax.bar(x + (i - (len(variants) - 1) / 2) * width, values, width, label=variant)
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("top-1 agreement with full context")
    ax.set_title("Top-1 agreement (teacher forced)")

    ax = axes[1]
    positive = [r["mean_kl"] for v in figures["variants"].values() for r in v.values() if r["mean_kl"] > 0]
    floor = min(positive, default=1e-6) / 10
    for i, variant in enumerate(variants):
        values = [figures["variants"][variant][m]["mean_kl"] for m in methods]
        ax.bar(
            x + (i - (len(variants) - 1) / 2) * width, [v if v > 0 else np.nan for v in values], width, label=variant
        )
        for j, value in enumerate(values):
            if value == 0:
                ax.annotate("0", (x[j] + (i - (len(variants) - 1) / 2) * width, floor), ha="center", va="bottom")
    ax.set_yscale("log")
    ax.set_ylim(floor, max(positive, default=1.0) * 20)  # headroom for the legend
    ax.set_ylabel("mean KL(full || method), nats")
    ax.set_title("Next-token KL divergence from full context")

    ax = axes[2]
    reference = figures["variants"][variants[-1]]
    ratios = (("kv_ratio", "KV entries kept"), ("flops_ratio", "prefill FLOPs"), ("peak_ratio", "peak memory"))
    width3 = 0.8 / len(ratios)
    for i, (key, label) in enumerate(ratios):
        ax.bar(x + (i - 1) * width3, [reference[m][key] for m in methods], width3, label=label)
    ax.set_ylim(0, 1.3)
    ax.set_ylabel(f"ratio to full context ({variants[-1]})")
    ax.set_title("Cost relative to full context")

    for ax in axes:
        ax.set_xticks(x, methods, rotation=60, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", ncol=3)
    sizes = ", ".join(f"{p['images']} img/{p['prompt_len']} tok" for p in figures["prompts"])
    fig.suptitle(
        f"Fidelity on the tiny RANDOM-WEIGHT LLaVA (plumbing check, not accuracy); prompts: {sizes}", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(plot_path(path), dpi=110)
    plt.close(fig)
