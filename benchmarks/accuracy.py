"""``mmrag bench accuracy``: does compression keep the answer? Held-out exact match of the trained MLLM.

The model is the project's trained small LLaVA (:mod:`mmrag.serving.models.trained`, ``mmrag train-tiny``);
the tasks are the held-out split of :mod:`mmrag.training.tasks` (never seen in training), up to 6 images of
16 visual tokens per prompt. Every method runs in the reference engine on the same tasks, greedy, and an
answer counts when it is exactly the expected one (eos included).

Two turns: the prefill holds the images and a first question (the colour of the last image) whose answer is
teacher-forced, and the measured question comes in the second turn, fed token by token after the prefill.
LOOK-M compresses the cache *after* the prefill, so a question inside the prefill is answered from the full
cache whatever the budget (a first version of this benchmark did that: every LOOK-M and eviction row equalled
``full``); in the second turn the answer reads what the method kept. The model was trained on such later
turns (``Task.follow_ups``). Rows:

- ``full``: no method (the baseline, measured in the same run);
- ``aim_merge_1/2``, ``aim_merge_1/4``: AIM stage (a), one or two 2:1 bipartite passes per image, the
  merged tokens at contiguous positions as in AIM; ``aim_spread_..``: the same merge with the tokens spread
  over each image's original span, the text after it at its original positions (``AIMMerge.positions``);
  ``..+prune``: plus AIM stage (b) pruning inside the LLM, scaled to 4 layers (start 1, end 3: layers 2 and
  3 read 2/3 and 1/3 of the visual keys);
- ``lookm_<merge>@b``: LOOK-M at image budget ``b`` (all text + ``ceil(b * image tokens)`` image entries
  per head and layer, chosen by the text-prior score), merges pivotal / averaged / weighted / none;
- ``random@b``, ``recent@b``, ``scores@b``: the naive controls at the same number of entries
  (:mod:`mmrag.kernels.kv_baselines`): random image entries, the last entries only, top scores with text
  unprotected.

With ``--vllm`` (on by default; ``--no-vllm`` skips it) the same tasks also run through vLLM with the
plugin's AIM model class: ``vllm_full`` (keep ratio 1: stock vLLM's prompt), ``vllm_aim_merge_1/2`` and
``vllm_aim_merge_1/4`` (per-request keep ratios), and ``vllm_aim_spread_..`` from a second engine
deployed with ``aim_positions: spread``, greedy, bf16 as served. AIM's pruning is not in vLLM (the
README says why). LOOK-M is, but it compacts once, after a request's prefill, and vLLM cannot take a second
turn into a kept cache (a follow-up request is prefilled again; prefix caching is off under LOOK-M), so the
two-turn protocol has no vLLM form; ``tests/vllm_plugin/test_lookm_vllm.py`` checks that vLLM with LOOK-M
decodes the reference engine's LOOK-M tokens (log-probabilities within 1e-4 in fp32; 1.2e-6 measured), so the
reference rows stand for it.

Per row: exact match per family and the mean over image families, ``kv_ratio`` (prompt KV entries kept over
the full cache's) and ``accuracy_ratio`` (mean over ``full``'s). The knowledge family has no image, so no
method changes it; it is reported for the full context with and without its documents (what text RAG adds).

Why the budget is a share of the image entries and not of the prompt (LOOK-M's ``heavy/recent`` ratios):
LOOK-M keeps all text whatever the ratio, and on these prompts text is a third to a half of the tokens, so a
10% or 20% prompt budget keeps no image entry at all and every method would score the same.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "Held-out accuracy of the trained MLLM: full context vs AIM, LOOK-M and naive KV eviction."

BUDGETS = (0.1, 0.2, 0.4)
QUICK_BUDGETS = (0.2,)
MERGES = ("pivotal", "averaged", "weighted", None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--per-family", type=int, default=None, help="Held-out tasks per family (default 48; 6 quick).")
    parser.add_argument("--model", default="tiny-mllm", help="A registered model name or a checkpoint directory.")
    parser.add_argument("--max-images", type=int, default=6)
    parser.add_argument(
        "--no-vllm", dest="vllm", action="store_false", help="Skip the vLLM rows (the reference engine only)."
    )


def method_grid(quick: bool) -> dict[str, Any]:
    """Row name -> :class:`~mmrag.kernels.reference.engine.ReferenceMethods`."""
    from mmrag.kernels.methods import KV_METHODS, make_kv_method
    from mmrag.kernels.methods.aim import AIMMerge, AIMPrune
    from mmrag.kernels.methods.lookm import LookM
    from mmrag.kernels.reference.engine import ReferenceMethods

    prune = AIMPrune(start_layer=1, end_layer=3)
    grid = {"full": ReferenceMethods()}
    for positions, kind in (("contiguous", "merge"), ("spread", "spread")):
        for passes, label in ((1, "1/2"), (2, "1/4")):
            merge = AIMMerge(num_passes=passes, positions=positions)
            grid[f"aim_{kind}_{label}"] = ReferenceMethods(merge=merge)
            grid[f"aim_{kind}_{label}+prune"] = ReferenceMethods(merge=merge, prune=prune)
    grid["aim_prune"] = ReferenceMethods(prune=prune)
    for budget in QUICK_BUDGETS if quick else BUDGETS:
        for merge in ("pivotal", None) if quick else MERGES:
            grid[f"lookm_{merge or 'evict'}@{budget}"] = ReferenceMethods(kv=LookM(merge=merge, image_budget=budget))
        for name in [n for n in KV_METHODS if n != "lookm"]:  # every registered control, at LOOK-M's budget
            grid[f"{name}@{budget}"] = ReferenceMethods(kv=make_kv_method(name, image_budget=budget))
    return grid


def two_turns(task, tokenizer, tokens_per_image: int) -> tuple[list[int], list[int]]:
    """(prefill ids, ids fed after it): images + "colour of the last image?" with its answer, then the
    task's question in a second user turn, up to the generation prompt."""
    from dataclasses import replace

    from mmrag.training.data import encode_answer, encode_prompt, encode_turn

    first = f"What colour is the shape in Image {len(task.images)}?"
    opening = replace(task, parts=(*task.parts[:-1], first))
    prefill = encode_prompt(opening, tokenizer, tokens_per_image)
    return prefill, encode_answer(tokenizer, task.shown[-1].colour) + encode_turn(tokenizer, task.question)


def _answer(engine, tokenizer, prefill_ids: list[int], fed: list[int], pixels) -> tuple[str, int]:
    """Greedy answer after feeding ``fed`` into the cache the prefill left; and that cache's prompt entries."""
    import torch

    prefill = engine.prefill(torch.tensor([prefill_ids]), pixels)
    kv_entries = prefill.cache.num_live_entries()
    logits = prefill.logits[-1]
    for token in fed:
        logits = engine.decode_step(prefill.cache, token)
    tokens: list[int] = []
    while len(tokens) < 8:
        tokens.append(int(logits.argmax()))
        if tokens[-1] == tokenizer.eos_token_id:
            return tokenizer.decode(tokens[:-1]), kv_entries
        logits = engine.decode_step(prefill.cache, tokens[-1])
    return tokenizer.decode(tokens) + "…", kv_entries


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from mmrag.benchmarks.common import model_checkpoint, plot_path, write_result
    from mmrag.kernels.reference.engine import ReferenceEngine
    from mmrag.training.data import pixel_values
    from mmrag.training.tasks import FAMILIES, IMAGE_FAMILIES, make_task

    per_family = args.per_family or (6 if args.quick else 48)
    model_path = model_checkpoint(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = ReferenceEngine.from_pretrained(model_path)
    tokens_per_image = int(base.model.config.image_seq_length)
    tasks = {
        family: [
            make_task(family, i, split="heldout", max_images=args.max_images, max_documents=3)
            for i in range(per_family)
        ]
        for family in FAMILIES
    }
    grid = method_grid(args.quick)
    rows: dict[str, dict[str, Any]] = {}
    progress = tqdm(total=len(grid) * len(IMAGE_FAMILIES) * per_family, desc="accuracy", unit="task")
    for name, methods in grid.items():
        engine = ReferenceEngine(base.model, methods)
        hits: dict[str, int] = {}
        kept = 0
        for family in IMAGE_FAMILIES:
            hits[family] = 0
            for task in tasks[family]:
                prefill_ids, fed = two_turns(task, tokenizer, tokens_per_image)
                text, kv = _answer(engine, tokenizer, prefill_ids, fed, pixel_values(task.images))
                hits[family] += text == task.answer
                kept += kv
                progress.update()
        accuracy = {family: n / per_family for family, n in hits.items()}
        rows[name] = {
            "accuracy": accuracy,
            "mean": sum(accuracy.values()) / len(accuracy),
            "kv_entries": kept,
        }
    progress.close()
    if args.vllm:
        rows.update(_vllm_rows(model_path, tasks, args.max_images))
    for row in rows.values():
        # Against the full run's cache: AIM's merge shortens the prompt itself, so its own count would hide it.
        row["kv_ratio"] = row["kv_entries"] / rows["full"]["kv_entries"]
        row["accuracy_ratio"] = row["mean"] / rows["full"]["mean"] if rows["full"]["mean"] else None
    figures = {"methods": rows, "knowledge": _knowledge(base, tokenizer, tasks["knowledge"], tokens_per_image)}
    config = {
        "quick": args.quick,
        "per_family": per_family,
        "max_images": args.max_images,
        "model": str(model_path),
        "split": "heldout",
        "engine": "reference (transformers eager, fp32 from the bf16 checkpoint)",
        "aim_prune": {"start_layer": 1, "end_layer": 3},
        "vllm": args.vllm,
    }
    path = write_result("accuracy", figures, config, args.out)
    _plot(rows, plot_path(path))
    print(_table(rows))
    print(f"knowledge: {figures['knowledge']}")
    print(f"wrote {path} and {plot_path(path)}")
    return 0


# Row -> (the deployment's aim_positions, the request's keep ratio).
VLLM_ROWS = {
    "vllm_full": ("contiguous", 1.0),
    "vllm_aim_merge_1/2": ("contiguous", 0.5),
    "vllm_aim_merge_1/4": ("contiguous", 0.25),
    "vllm_aim_spread_1/2": ("spread", 0.5),
    "vllm_aim_spread_1/4": ("spread", 0.25),
}


def _vllm_rows(model_path: Path, tasks: dict[str, list], max_images: int) -> dict[str, dict[str, Any]]:
    """The image families through vLLM (plugin AIM class), one row per keep ratio; KV = prompt tokens.
    One engine per position layout (it is a deployment setting: the spread one runs vLLM's M-RoPE path)."""
    import os

    from transformers import AutoTokenizer
    from vllm import LLM

    from mmrag.serving.vllm_plugin.aim import aim_overrides

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows = {}
    for layout in ("contiguous", "spread"):
        llm = LLM(
            model=str(model_path),
            enforce_eager=True,
            max_model_len=1024,
            seed=0,
            limit_mm_per_prompt={"image": max_images},
            hf_overrides=aim_overrides(model_path, 1.0, layout),
        )
        try:
            for name, (positions, ratio) in VLLM_ROWS.items():
                if positions == layout:
                    rows[name] = _vllm_row(llm, tokenizer, tasks, ratio)
        finally:
            llm.llm_engine.engine_core.shutdown()
    return rows


def _vllm_row(llm, tokenizer, tasks: dict[str, list], ratio: float) -> dict[str, Any]:
    """Exact match per image family at one per-request keep ratio, and the prefill's KV entries."""
    from PIL import Image
    from vllm import SamplingParams

    from mmrag.training.tasks import IMAGE_FAMILIES

    text_config = llm.llm_engine.model_config.hf_config.text_config
    params = SamplingParams(temperature=0.0, max_tokens=8)
    hits, kept = {}, 0
    for family in IMAGE_FAMILIES:
        prompts, fed_tokens = [], 0
        for t in tasks[family]:
            prefill_ids, fed = two_turns(t, tokenizer, tokens_per_image=1)  # vLLM expands each
            fed_tokens += len(fed)
            prompts.append(
                {
                    "prompt_token_ids": prefill_ids + fed,
                    "multi_modal_data": {"image": [Image.fromarray(px) for px in t.images]},
                    "mm_processor_kwargs": {"aim_keep_ratio": ratio},
                }
            )
        outs = llm.generate(prompts, params, use_tqdm=False)
        hits[family] = sum(
            o.outputs[0].finish_reason == "stop" and o.outputs[0].text == t.answer
            for o, t in zip(outs, tasks[family], strict=True)
        ) / len(outs)
        # The reference engine counts the prefill's entries: the second turn is not part of them.
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outs) - fed_tokens
        kept += prompt_tokens * text_config.num_hidden_layers * text_config.num_key_value_heads
    return {"accuracy": hits, "mean": sum(hits.values()) / len(hits), "kv_entries": kept}


def _knowledge(engine, tokenizer, tasks, tokens_per_image: int) -> dict[str, float]:
    """Exact match on the text-only family, with the documents in the prompt and without them."""
    from mmrag.training.data import encode_prompt

    scores = {}
    for label, with_documents in (("with_documents", True), ("without_documents", False)):
        hits = 0
        for task in tasks:
            ids = encode_prompt(task, tokenizer, tokens_per_image, with_documents=with_documents)
            hits += _answer(engine, tokenizer, ids, [], None)[0] == task.answer
        scores[label] = hits / len(tasks)
    return scores


def _table(rows: dict[str, dict[str, Any]]) -> str:
    families = list(next(iter(rows.values()))["accuracy"])
    lines = [f"{'method':28s} " + " ".join(f"{f:>8s}" for f in families) + "     mean  kv_ratio"]
    for name, row in rows.items():
        cells = " ".join(f"{row['accuracy'][f]:8.2f}" for f in families)
        lines.append(f"{name:28s} {cells} {row['mean']:8.3f} {row['kv_ratio']:9.3f}")
    return "\n".join(lines)


def _plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    from mmrag.benchmarks.common import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 6))
    colours = {"full": "black", "aim": "tab:purple", "lookm": "tab:green", "random": "tab:gray"}
    colours.update({"recent": "tab:orange", "scores": "tab:red"})
    for name, row in rows.items():
        family = name.split("_")[0].split("@")[0]
        ax.scatter(row["kv_ratio"], row["mean"], color=colours.get(family, "tab:blue"), s=30)
        ax.annotate(name, (row["kv_ratio"], row["mean"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("prompt KV entries kept / full")
    ax.set_ylabel("held-out exact match (image families)")
    ax.set_title("Trained tiny LLaVA: accuracy vs KV kept (reference engine)")
    ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
