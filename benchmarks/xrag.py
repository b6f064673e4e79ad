"""``mmrag bench xrag``: xRAG against text RAG and no retrieval, through vLLM, on held-out knowledge tasks.

Model: the project's trained small LLaVA (``mmrag train-tiny``) with its xRAG projector for the bundled
MiniLM encoder (``mmrag train-projector``), served by vLLM with the plugin's xRAG class, greedy, bf16.

- **Accuracy**: exact match on held-out knowledge tasks (entities never seen in training, 1-3 documents,
  the relevant one anywhere among them), three ways: ``none`` (the question alone), ``text`` (the documents
  as text RAG inserts them) and ``xrag`` (each document one ``<xrag>`` token carrying its projected MiniLM
  vector, in the same layout). The documents are the task's own (an oracle retriever): this measures how
  much of a document one token carries, not retrieval (``mmrag bench retrieval`` measures that).
- **Cost** at 1, 4 and 8 documents: prompt tokens, and time to first token (one request at a time,
  ``max_tokens=1``, prefix caching off, median over ``--repeats`` prompts with different documents) for
  ``none``, ``text`` and ``xrag``; ratios are xrag/text, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

HELP = "xRAG vs text RAG vs no retrieval (trained model, vLLM): exact match, prompt tokens, time to first token."

MODES = ("none", "text", "xrag")
DOCUMENT_COUNTS = (1, 4, 8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=int, default=None, help="Held-out knowledge tasks (default 256; 24 quick).")
    parser.add_argument("--repeats", type=int, default=None, help="Prompts per cost point (default 24; 4 quick).")
    parser.add_argument("--model", default=None, help="Checkpoint (default: the trained model in the repository).")
    parser.add_argument("--projector", default=None, help="xRAG projector (default: the shipped one).")


def prompt_for(task, mode: str, tokenizer, vectors: dict[str, Any]) -> dict[str, Any]:
    """The vLLM prompt of ``task`` in ``mode`` (rendered as the server renders it)."""
    import dataclasses

    import numpy as np

    from mmrag.training.tasks.chat import template_messages
    from mmrag.training.train_projector import xrag_view

    shown = {"none": dataclasses.replace(task, documents=()), "text": task, "xrag": xrag_view(task)}[mode]
    text = tokenizer.apply_chat_template(template_messages(shown), tokenize=False, add_generation_prompt=True)
    prompt: dict[str, Any] = {"prompt": text}
    if mode == "xrag":
        prompt["multi_modal_data"] = {"retrieval": np.stack([vectors[d] for d in task.documents])}
    return prompt


def with_documents(task, count: int, pool: list):
    """``task`` with ``count`` documents: its relevant one first, then others' (distractors)."""
    import dataclasses

    from mmrag.training.tasks import document_source

    others = [d for t in pool for d in t.documents if t is not task and d != task.documents[task.relevant]]
    documents = (task.documents[task.relevant], *others[: count - 1])
    return dataclasses.replace(
        task, documents=documents, relevant=0, sources=tuple(document_source(d) for d in documents)
    )


def run(args: argparse.Namespace) -> int:
    import os

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from mmrag.benchmarks.common import plot_path, write_result
    from mmrag.serving.config import MmragConfig
    from mmrag.serving.engine.args import xrag_overrides
    from mmrag.serving.models.trained import trained_model_path, trained_projector_path
    from mmrag.serving.retrieval.config import EncoderConfig
    from mmrag.serving.retrieval.encoders import load_encoder
    from mmrag.training.tasks import make_task
    from mmrag.training.train_projector import encode_documents

    n_tasks = args.tasks or (24 if args.quick else 256)
    repeats = args.repeats or (4 if args.quick else 24)
    model_path = Path(args.model) if args.model else trained_model_path()
    projector = Path(args.projector) if args.projector else trained_projector_path()
    config = MmragConfig.model_validate({"retrieval": {"xrag": {"projector": str(projector)}}})
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tasks = [make_task("knowledge", i, split="heldout", max_documents=3) for i in range(n_tasks)]
    cost_tasks = [make_task("knowledge", 10_000 + i, split="heldout", max_documents=3) for i in range(repeats * 9)]
    encoder = load_encoder(EncoderConfig())
    vectors = encode_documents(encoder, [d for t in [*tasks, *cost_tasks] for d in t.documents], progress=True)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(
        model=str(model_path),
        enforce_eager=True,
        max_model_len=2048,
        seed=0,
        enable_prefix_caching=False,  # every time-to-first-token below is a full prefill
        limit_mm_per_prompt={"image": 0, "retrieval": max(DOCUMENT_COUNTS)},
        hf_overrides=xrag_overrides(config, str(model_path)),
    )
    try:
        accuracy, by_attribute = _accuracy(
            llm, SamplingParams(temperature=0.0, max_tokens=8), tasks, tokenizer, vectors
        )
        cost = _cost(llm, SamplingParams(temperature=0.0, max_tokens=1), cost_tasks, repeats, tokenizer, vectors)
    finally:
        llm.llm_engine.engine_core.shutdown()
    gain = accuracy["text"] - accuracy["none"]
    figures = {
        "exact_match": accuracy,
        "exact_match_by_attribute": by_attribute,
        # The published claim: xRAG recovers much of text RAG's gain over no retrieval.
        "xrag_share_of_text_rag_gain": (accuracy["xrag"] - accuracy["none"]) / gain if gain > 0 else None,
        "cost": cost,
    }
    run_config = {
        "model": str(model_path),
        "projector": str(projector),
        "encoder": encoder.name,
        "tasks": n_tasks,
        "repeats": repeats,
        "document_counts": list(DOCUMENT_COUNTS),
        "quick": args.quick,
        "engine": "vLLM (plugin XragLlavaForConditionalGeneration), bf16, greedy, prefix caching off",
    }
    path = write_result("xrag", figures, run_config, args.out)
    _plot(figures, plot_path(path))
    print(_table(figures))
    print(f"wrote {path} and {plot_path(path)}")
    return 0


def _accuracy(llm, params, tasks, tokenizer, vectors) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Exact match per mode, overall and per asked attribute (colour, place, number)."""
    from mmrag.training.tasks.families import ATTRIBUTES

    overall, by_attribute = {}, {}
    for mode in MODES:
        outs = llm.generate([prompt_for(t, mode, tokenizer, vectors) for t in tasks], params, use_tqdm=False)
        right = [
            o.outputs[0].finish_reason == "stop" and o.outputs[0].text == t.answer
            for o, t in zip(outs, tasks, strict=True)
        ]
        overall[mode] = sum(right) / len(tasks)
        by_attribute[mode] = {}
        for attribute in ATTRIBUTES:
            asked = [r for r, t in zip(right, tasks, strict=True) if f"the {attribute} of" in t.question]
            by_attribute[mode][attribute] = sum(asked) / max(1, len(asked))
    return overall, by_attribute


def _cost(llm, params, pool, repeats: int, tokenizer, vectors) -> dict[str, Any]:
    """Per document count and mode: prompt tokens and median time to first token (one request at a time)."""
    rows: dict[str, Any] = {}
    for count in DOCUMENT_COUNTS:
        row: dict[str, Any] = {}
        tasks = [with_documents(t, count, pool) for t in pool[:repeats]]
        for mode in MODES:
            tokens, seconds = [], []
            for task in tasks:
                prompt = prompt_for(task, mode, tokenizer, vectors)
                start = time.perf_counter()
                (out,) = llm.generate([prompt], params, use_tqdm=False)
                seconds.append(time.perf_counter() - start)
                tokens.append(len(out.prompt_token_ids))
            row[mode] = {"prompt_tokens": statistics.mean(tokens), "ttft_s_median": statistics.median(seconds)}
        row["xrag_over_text"] = {
            "prompt_tokens": row["xrag"]["prompt_tokens"] / row["text"]["prompt_tokens"],
            "ttft": row["xrag"]["ttft_s_median"] / row["text"]["ttft_s_median"],
        }
        rows[str(count)] = row
    return rows


def _table(figures: dict[str, Any]) -> str:
    lines = ["exact match: " + " ".join(f"{m} {v:.3f}" for m, v in figures["exact_match"].items())]
    for mode, scores in figures["exact_match_by_attribute"].items():
        lines.append(f"  {mode:5s} " + " ".join(f"{a} {v:.3f}" for a, v in scores.items()))
    lines.append(f"{'documents':>9s} " + " ".join(f"{m + ' tokens':>12s} {m + ' ttft ms':>12s}" for m in MODES))
    for count, row in figures["cost"].items():
        cells = " ".join(f"{row[m]['prompt_tokens']:12.1f} {1000 * row[m]['ttft_s_median']:12.2f}" for m in MODES)
        ratio = row["xrag_over_text"]
        lines.append(f"{count:>9s} {cells}   xrag/text tokens {ratio['prompt_tokens']:.3f} ttft {ratio['ttft']:.3f}")
    return "\n".join(lines)


def _plot(figures: dict[str, Any], path: Path) -> None:
    from mmrag.benchmarks.common import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    accuracy = figures["exact_match"]
    left.bar(list(accuracy), list(accuracy.values()), color=["tab:gray", "tab:blue", "tab:green"])
    left.set_ylim(0, 1)
    left.set_ylabel("held-out exact match")
    left.set_title("Knowledge questions (trained tiny LLaVA, vLLM)")
    counts = [int(c) for c in figures["cost"]]
    for mode, colour in zip(MODES, ("tab:gray", "tab:blue", "tab:green"), strict=True):
        right.plot(
            counts, [figures["cost"][str(c)][mode]["prompt_tokens"] for c in counts], "o-", color=colour, label=mode
        )
    right.set_xlabel("documents in the prompt")
    right.set_ylabel("prompt tokens")
    right.set_title("Prompt length (labels: xRAG/text time to first token)")
    for c in counts:
        ratio = figures["cost"][str(c)]["xrag_over_text"]["ttft"]
        right.annotate(f"ttft x{ratio:.2f}", (c, figures["cost"][str(c)]["xrag"]["prompt_tokens"]), fontsize=8)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
