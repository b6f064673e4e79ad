"""``mmrag bench xrag``: xRAG against text RAG and no retrieval, through vLLM, on held-out questions.

Model: a registered model (``--model``, default ``tiny-mllm``: the project's trained small LLaVA) with its
shipped xRAG projector for the bundled MiniLM encoder where it has one (``tiny-mllm``), served by vLLM (the
plugin's xRAG class when a projector is given), greedy, bf16. Without a projector the ``xrag`` rows are null.

- **Knowledge tasks** (the task generator's family; exact match): entities never seen in training, 1-3
  documents, the relevant one anywhere among them, three ways: ``none`` (the question alone), ``text`` (the
  documents as text RAG inserts them) and ``xrag`` (each document one ``<xrag>`` token carrying its projected
  MiniLM vector, in the same layout). The documents are the task's own (an oracle retriever): this measures
  how much of a document one token carries, not retrieval (``mmrag bench retrieval`` measures that).
- **English questions** about invented documents (``training/tasks/english.py``, held-out entities; the
  answer is counted if the reply contains it): the relevant document alone and with 3 distractors, in the
  server's text RAG layout (its default instruction and document template). What a real instruct model
  reads from retrieved text, and what no retrieval gets by guessing (the facts are invented: near 0).
- **Cost** at 1, 4 and 8 documents (knowledge tasks): prompt tokens, and time to first token (one request
  at a time, ``max_tokens=1``, prefix caching off, median and range over ``--repeats`` prompts with
  different documents, after a warm-up per mode) for each mode, the modes in a shuffled order per prompt;
  ratios are xrag/text, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

HELP = "xRAG vs text RAG vs no retrieval (vLLM): accuracy on held-out questions, prompt tokens, time to first token."

MODES = ("none", "text", "xrag")
DOCUMENT_COUNTS = (1, 4, 8)
ENGLISH_DOCUMENT_COUNTS = (1, 4)
# Shipped xRAG projectors by registered model.
PROJECTORS = {
    "tiny-mllm": "mmrag.serving.models.trained:trained_projector_path",
    "smol": "mmrag.serving.models.smol:smol_projector_path",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=int, default=None, help="Held-out knowledge tasks (default 256; 24 quick).")
    parser.add_argument("--repeats", type=int, default=None, help="Prompts per cost point (default 24; 4 quick).")
    parser.add_argument("--english", type=int, default=None, help="Held-out English questions (default 200; 24 quick).")
    parser.add_argument("--model", default="tiny-mllm", help="A registered model name or a checkpoint directory.")
    parser.add_argument("--projector", default=None, help="xRAG projector (default: the model's shipped one, if any).")


def prompt_for(task, mode: str, tokenizer, vectors: dict[str, Any], layout=None) -> dict[str, Any]:
    """The vLLM prompt of ``task`` in ``mode`` (rendered as the server renders it); ``layout``: the xRAG
    projector's prompt layout (its card's; None: text RAG's)."""
    import dataclasses

    import numpy as np

    from mmrag.training.tasks.chat import template_messages
    from mmrag.training.train_projector import xrag_view

    shown = {"none": dataclasses.replace(task, documents=()), "text": task, "xrag": xrag_view(task)}[mode]
    messages = template_messages(shown, layout=layout if mode == "xrag" else None)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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


def _model_and_projector(args: argparse.Namespace) -> tuple[Path, Path | None]:
    import importlib

    from mmrag.benchmarks.common import model_checkpoint

    model = model_checkpoint(args.model)
    if args.projector is not None:
        return model, Path(args.projector)
    shipped = PROJECTORS.get(args.model)
    if shipped is None:
        return model, None
    module, _, function = shipped.partition(":")
    return model, getattr(importlib.import_module(module), function)()


def run(args: argparse.Namespace) -> int:
    import os

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from mmrag.benchmarks.common import plot_path, write_result
    from mmrag.serving.config import MmragConfig
    from mmrag.serving.engine.args import xrag_overrides
    from mmrag.serving.retrieval.config import EncoderConfig, TextRagConfig
    from mmrag.serving.retrieval.encoders import load_encoder
    from mmrag.serving.xrag.projector import read_card
    from mmrag.training.tasks import make_task
    from mmrag.training.tasks.english import distractors, questions
    from mmrag.training.train_projector import encode_documents

    n_tasks = args.tasks or (24 if args.quick else 256)
    n_english = args.english or (24 if args.quick else 200)
    repeats = args.repeats or (4 if args.quick else 24)
    model_path, projector = _model_and_projector(args)
    modes = MODES if projector else MODES[:2]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tasks = [make_task("knowledge", i, split="heldout", max_documents=3) for i in range(n_tasks)]
    cost_tasks = [make_task("knowledge", 10_000 + i, split="heldout", max_documents=3) for i in range(repeats * 9)]
    english = [
        (q, distractors(q, max(ENGLISH_DOCUMENT_COUNTS) - 1, seed=0)) for q in questions(0, "heldout", n_english)
    ]
    vectors: dict[str, Any] = {}
    encoder = load_encoder(EncoderConfig())
    # The layout the projector was trained in (text RAG's for the tiny model's, a lean one for smol's).
    layout = read_card(projector).prompt_layout(TextRagConfig()) if projector else None
    if projector:
        texts = [d for t in [*tasks, *cost_tasks] for d in t.documents]
        texts += [d.text for q, others in english for d in (q.doc, *others)]
        vectors = encode_documents(encoder, texts, progress=True)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine: dict[str, Any] = {}
    if projector:
        config = MmragConfig.model_validate({"retrieval": {"xrag": {"projector": str(projector)}}})
        engine = {
            "limit_mm_per_prompt": {"image": 0, "retrieval": max(DOCUMENT_COUNTS)},
            "hf_overrides": xrag_overrides(config, str(model_path)),
        }
    llm = LLM(
        model=str(model_path),
        enforce_eager=True,
        max_model_len=2048,
        seed=0,
        enable_prefix_caching=False,  # every time-to-first-token below is a full prefill
        **engine,
    )
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=32)  # room for a chat model's sentence
        accuracy, by_attribute = _accuracy(llm, greedy, tasks, tokenizer, vectors, modes, layout)
        reading = _english_accuracy(
            llm, SamplingParams(temperature=0.0, max_tokens=48), english, tokenizer, vectors, modes, layout
        )
        first_token = SamplingParams(temperature=0.0, max_tokens=1)
        cost = _cost(llm, first_token, cost_tasks, repeats, tokenizer, vectors, modes, layout)
    finally:
        llm.llm_engine.engine_core.shutdown()
    contains = accuracy.pop("contains")
    figures = {
        "exact_match": accuracy,
        "knowledge_contains_answer": contains,
        "exact_match_by_attribute": by_attribute,
        # The published claim: xRAG recovers much of text RAG's gain over no retrieval.
        "xrag_share_of_text_rag_gain": _share_of_gain(accuracy),
        "english_contains_answer": reading,
        "english_xrag_share_of_text_rag_gain": {k: _share_of_gain(v) for k, v in reading.items()},
        "cost": cost,
    }
    run_config = {
        "model": str(model_path),
        "projector": str(projector) if projector else None,
        "xrag_layout": layout.model_dump(include={"instruction", "document_template"}) if layout else None,
        "encoder": encoder.name,
        "tasks": n_tasks,
        "english_questions": n_english,
        "repeats": repeats,
        "document_counts": list(DOCUMENT_COUNTS),
        "english_document_counts": list(ENGLISH_DOCUMENT_COUNTS),
        "quick": args.quick,
        "engine": "vLLM"
        + (" (plugin XragLlavaForConditionalGeneration)" if projector else "")
        + ", bf16, greedy, prefix caching off",
    }
    path = write_result("xrag", figures, run_config, args.out)
    _plot(figures, plot_path(path), modes)
    print(_table(figures, modes))
    print(f"wrote {path} and {plot_path(path)}")
    return 0


def _share_of_gain(accuracy: dict[str, float]) -> float | None:
    gain = accuracy["text"] - accuracy["none"]
    return (accuracy["xrag"] - accuracy["none"]) / gain if "xrag" in accuracy and gain > 0 else None


def english_prompt(question, documents, mode: str, tokenizer, vectors: dict[str, Any], layout=None) -> dict[str, Any]:
    """The vLLM prompt of an English question with ``documents`` (its own first) as the server renders it."""
    import numpy as np

    from mmrag.serving.xrag.projector import XRAG_TOKEN
    from mmrag.training.tasks.chat import context_text

    messages: list[dict[str, Any]] = []
    if mode != "none":
        shown = tuple(XRAG_TOKEN if mode == "xrag" else d.text for d in documents)
        sources = tuple(f"docs/{d.title.lower().replace(' ', '-')}.md" for d in documents)
        messages.append({"role": "system", "content": context_text(shown, sources, layout if mode == "xrag" else None)})
    messages.append({"role": "user", "content": question.question})
    prompt: dict[str, Any] = {
        "prompt": tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    }
    if mode == "xrag":
        prompt["multi_modal_data"] = {"retrieval": np.stack([vectors[d.text] for d in documents])}
    return prompt


def _english_accuracy(llm, params, english, tokenizer, vectors, modes, layout) -> dict[str, dict[str, float]]:
    """Per document count, per mode: the share of replies that contain the expected answer."""
    from mmrag.training.tasks.english import contains_answer

    table: dict[str, dict[str, float]] = {}
    for count in ENGLISH_DOCUMENT_COUNTS:
        row = {}
        for mode in modes:
            shown = [(q, _shuffled((q.doc, *others[: count - 1]), q.question)) for q, others in english]
            prompts = [english_prompt(q, docs, mode, tokenizer, vectors, layout) for q, docs in shown]
            outs = llm.generate(prompts, params, use_tqdm=False)
            row[mode] = sum(contains_answer(o.outputs[0].text, q) for o, (q, _) in zip(outs, shown, strict=True))
            row[mode] /= len(english)
        table[str(count)] = row
    return table


def _shuffled(documents: tuple, key: str) -> tuple:
    """The relevant document anywhere among the others, the same place in every mode."""
    import random

    order = list(documents)
    random.Random(key).shuffle(order)
    return tuple(order)


def _accuracy(
    llm, params, tasks, tokenizer, vectors, modes, layout
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Per mode: exact match (the reply is the answer and stops: what the trained tiny model is built for)
    overall and per asked attribute (colour, place, number), and ``contains`` (the answer as a word of the
    reply: what a chat model's sentences are judged by)."""
    import re

    from mmrag.training.tasks.families import ATTRIBUTES

    overall: dict[str, Any] = {"contains": {}}
    by_attribute: dict[str, dict[str, float]] = {}
    for mode in modes:
        prompts = [prompt_for(t, mode, tokenizer, vectors, layout) for t in tasks]
        outs = llm.generate(prompts, params, use_tqdm=False)
        replies = [o.outputs[0] for o in outs]
        right = [r.finish_reason == "stop" and r.text == t.answer for r, t in zip(replies, tasks, strict=True)]
        found = [
            re.search(rf"\b{re.escape(t.answer)}\b", r.text, re.I) is not None
            for r, t in zip(replies, tasks, strict=True)
        ]
        overall[mode] = sum(right) / len(tasks)
        overall["contains"][mode] = sum(found) / len(tasks)
        by_attribute[mode] = {}
        for attribute in ATTRIBUTES:
            asked = [r for r, t in zip(right, tasks, strict=True) if f"the {attribute} of" in t.question]
            by_attribute[mode][attribute] = sum(asked) / max(1, len(asked))
    return overall, by_attribute


def _cost(llm, params, pool, repeats: int, tokenizer, vectors, modes, layout) -> dict[str, Any]:
    """Per document count and mode: prompt tokens and time to first token (one request at a time).

    Each mode answers one prompt first (warm-up: a new prompt shape pays one-time costs), then prompt by
    prompt the modes come in an order shuffled with a fixed seed, so that none is always first; the figure
    is the median over prompts with its range.
    """
    from mmrag.benchmarks.common import shuffled_rounds, spread

    rows: dict[str, Any] = {}
    for count in DOCUMENT_COUNTS:
        tasks = [with_documents(t, count, pool) for t in pool[:repeats]]
        for mode in modes:
            llm.generate([prompt_for(tasks[0], mode, tokenizer, vectors, layout)], params, use_tqdm=False)
        tokens: dict[str, list[int]] = {mode: [] for mode in modes}
        seconds: dict[str, list[float]] = {mode: [] for mode in modes}
        for task, order in zip(tasks, shuffled_rounds(modes, len(tasks), seed=count), strict=True):
            for mode in order:
                prompt = prompt_for(task, mode, tokenizer, vectors, layout)
                start = time.perf_counter()
                (out,) = llm.generate([prompt], params, use_tqdm=False)
                seconds[mode].append(time.perf_counter() - start)
                tokens[mode].append(len(out.prompt_token_ids))
        row: dict[str, Any] = {
            mode: {
                "prompt_tokens": statistics.mean(tokens[mode]),
                "ttft_s_median": statistics.median(seconds[mode]),
                "ttft_s_spread": spread(seconds[mode]),
            }
            for mode in modes
        }
        if "xrag" in row:
            row["xrag_over_text"] = {
                "prompt_tokens": row["xrag"]["prompt_tokens"] / row["text"]["prompt_tokens"],
                "ttft": row["xrag"]["ttft_s_median"] / row["text"]["ttft_s_median"],
            }
        rows[str(count)] = row
    return rows


def _table(figures: dict[str, Any], modes: tuple[str, ...]) -> str:
    lines = ["knowledge exact match: " + " ".join(f"{m} {v:.3f}" for m, v in figures["exact_match"].items())]
    contains = figures["knowledge_contains_answer"]
    lines.append("knowledge reply contains the answer: " + " ".join(f"{m} {v:.3f}" for m, v in contains.items()))
    for mode, scores in figures["exact_match_by_attribute"].items():
        lines.append(f"  {mode:5s} " + " ".join(f"{a} {v:.3f}" for a, v in scores.items()))
    for count, row in figures["english_contains_answer"].items():
        lines.append(f"english, {count} document(s): " + " ".join(f"{m} {v:.3f}" for m, v in row.items()))
    lines.append(f"{'documents':>9s} " + " ".join(f"{m + ' tokens':>12s} {m + ' ttft ms':>12s}" for m in modes))
    for count, row in figures["cost"].items():
        cells = " ".join(f"{row[m]['prompt_tokens']:12.1f} {1000 * row[m]['ttft_s_median']:12.2f}" for m in modes)
        ratio = row.get("xrag_over_text")
        tail = f"   xrag/text tokens {ratio['prompt_tokens']:.3f} ttft {ratio['ttft']:.3f}" if ratio else ""
        lines.append(f"{count:>9s} {cells}{tail}")
    return "\n".join(lines)


def _plot(figures: dict[str, Any], path: Path, modes: tuple[str, ...]) -> None:
    from mmrag.benchmarks.common import pyplot

    plt = pyplot()
    colours = dict(zip(MODES, ("tab:gray", "tab:blue", "tab:green"), strict=True))
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.5))
    for i, (metric, label) in enumerate((("exact_match", "exact match"), ("knowledge_contains_answer", "contains"))):
        scores = figures[metric]
        xs = [j + i * 0.4 for j in range(len(modes))]
        left.bar(xs, [scores[m] for m in modes], 0.4, color=[colours[m] for m in modes], alpha=1.0 - 0.5 * i)
        for x, m in zip(xs, modes, strict=True):
            left.annotate(label, (x, scores[m]), ha="center", fontsize=7)
    left.set_xticks([j + 0.2 for j in range(len(modes))], list(modes))
    left.set_ylim(0, 1)
    left.set_ylabel("held-out knowledge tasks")
    left.set_title("Knowledge tasks: exact reply, reply containing the answer")
    english = figures["english_contains_answer"]
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        xs = [j + i * width for j in range(len(english))]
        middle.bar(xs, [row[mode] for row in english.values()], width, color=colours[mode], label=mode)
    middle.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(english))], [f"{c} doc(s)" for c in english])
    middle.set_ylim(0, 1)
    middle.set_ylabel("replies containing the answer")
    middle.set_title("English questions, invented documents")
    middle.legend()
    counts = [int(c) for c in figures["cost"]]
    for mode in modes:
        tokens = [figures["cost"][str(c)][mode]["prompt_tokens"] for c in counts]
        right.plot(counts, tokens, "o-", color=colours[mode], label=mode)
    right.set_xlabel("documents in the prompt")
    right.set_ylabel("prompt tokens")
    right.set_title("Prompt length (labels: xRAG/text time to first token)")
    for c in counts:
        ratio = figures["cost"][str(c)].get("xrag_over_text")
        if ratio:
            right.annotate(
                f"ttft x{ratio['ttft']:.2f}", (c, figures["cost"][str(c)]["xrag"]["prompt_tokens"]), fontsize=8
            )
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
