"""One table of every committed result: what it measured, when, on which commit, at what load.

``python -m mmrag.benchmarks.report`` prints it; ``--write docs/results.md`` replaces the section between
:data:`START` and :data:`END` there. ``tests/unit/test_bench_report.py`` fails when that section differs from
what the committed JSONs give, so the summary cannot drift from the results it quotes.

A result written before the benchmarks recorded their provenance (about 2026-12-07) has no commit and no
load: the table says so, which marks it as due for a rerun on current code. The load average is the
machine's at the moment the result was written (1-minute figure; these are 2-core machines, so anything
above 2 means the run shared its cores).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmrag.benchmarks.common import RESULTS_DIR

__all__ = ["END", "START", "Row", "markdown", "read_rows", "replace_section"]

START = "<!-- report:start (python -m mmrag.benchmarks.report --write docs/results.md) -->"
END = "<!-- report:end -->"


@dataclass(frozen=True)
class Row:
    file: str
    benchmark: str
    date: str
    commit: str
    load: str
    headline: str


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _serving(f: dict[str, Any]) -> str:
    ratios = f.get("ratios", {}).get("mmrag/vllm-serve", {})
    parts = [
        f"{c} stream(s): TTFT {_x(r.get('ttft_s_p50'))}, TBT {_x(r.get('tbt_s_p50'))}, "
        f"tokens/s {_x(r.get('output_tokens_per_s'))}"
        for c, r in sorted(ratios.items(), key=lambda item: int(item[0]))
    ]
    valid = "" if f.get("all_valid") else " (some points flagged invalid)"
    return f"mmrag / vllm serve ({f.get('model')}): " + "; ".join(parts) + valid


def _load(f: dict[str, Any]) -> str:
    reached = "reached" if f.get("offered_reached") else "NOT reached"
    hostile = " + hostile mix" if f.get("hostile") else ""
    return (
        f"capacity {f['capacity_rps']:.1f} req/s, offered {f['offered_rps']:.1f} ({reached}){hostile}: "
        f"{f['succeeded']} ok / {f['rejected']} shed / {f['unexpected']} unexpected / {f['lost']} lost; "
        f"p99 {f['latency_s_p99']:.2f} s = {_x(f.get('p99_vs_unloaded'))} the unloaded p99"
    )


def _compression_rows(rows: dict[str, Any]) -> str:
    parts = []
    for name in ("aim@1/4", "lookm", "aim@1/4+lookm"):
        vs = rows.get(name, {}).get("vs_stock")
        if vs:
            parts.append(
                f"{name}: TTFT {_x(vs.get('ttft_ms'))}, KV/request {_x(vs.get('kv_tokens_per_request'))}, "
                f"throughput {_x(vs.get('throughput_tokens_per_s'))}"
            )
    return "; ".join(parts)


def _lookm_by_length(lengths: dict[str, Any]) -> str:
    parts = []
    for length, point in lengths.items():
        vs = point["rows"].get("lookm", {}).get("vs_stock", {})
        parts.append(
            f"{length} tokens: TTFT {_x(vs.get('ttft_ms'))}, decode {_x(vs.get('decode_tokens_per_s'))} "
            f"(together {_x(vs.get('batch_decode_tokens_per_s'))})"
        )
    return "LOOK-M vs stock by context length: " + "; ".join(parts)


def _compression(f: dict[str, Any]) -> str:
    families = f.get("families")
    if families is None:
        return "vs stock vLLM: " + _compression_rows(f["rows"])
    return " | ".join(
        f"{family}: " + (_lookm_by_length(v["lengths"]) if "lengths" in v else _compression_rows(v["rows"]))
        for family, v in families.items()
    )


def _retrieval(f: dict[str, Any]) -> str:
    return (
        f"{f['chunks']} chunks: search p50 {f['search_ms_p50']:.1f} ms (FLAT {f['flat_search_ms_p50']:.1f}), "
        f"recall@10 {f['recall_at_10']:.2f}, ingest {f['ingest_chunks_per_s']:.0f} chunks/s; "
        f"chat text RAG / none {_x(f.get('text_mode_latency_ratio'))}"
    )


def _autoscaling(f: dict[str, Any]) -> str:
    return (
        f"{f['min_replicas']} -> {f['max_replicas_reached']} LLM replicas in {f['time_to_scale_up_s']:.0f} s, "
        f"back down in {f['time_to_scale_down_s']:.0f} s; p50 {f['p50_latency_at_min_replicas_s']:.2f} s at "
        f"min, {f['p50_latency_at_max_replicas_s']:.2f} s at max; {f['requests']['errors']} errors"
    )


def _lookm_scores(f: dict[str, Any]) -> str:
    length = f["lengths"][-1]
    peaks = {kind: values[-1] for kind, values in f["peak_mib"].items()}
    return f"at {length} tokens, peak MiB: " + ", ".join(f"{kind} {mib:.0f}" for kind, mib in peaks.items())


def _fidelity(f: dict[str, Any]) -> str:
    peaky = f["variants"].get("peaky", {})
    parts = [
        f"{name}: top-1 {m['top1_agreement']:.2f}, KV {m['kv_ratio']:.2f}"
        for name, m in peaky.items()
        if name in ("aim-merge-25%", "aim-merge-50%", "lookm-pivotal-0.1", "lookm-pivotal-0.3")
    ]
    return "peaky variant vs full context: " + "; ".join(parts)


def _batch(f: dict[str, Any]) -> str:
    match = "identical outputs" if f.get("outputs_match") else "outputs DIFFER"
    return (
        f"mmrag batch {_x(f['batch_over_llm_chat'])} vLLM LLM.chat's requests/s, "
        f"{_x(f['batch_over_server'])} one-by-one server requests; {match}"
    )


def _modes(scores: dict[str, float]) -> str:
    return " / ".join(f"{mode} {scores[mode]:.2f}" for mode in ("none", "text", "xrag"))


def _xrag(f: dict[str, Any]) -> str:
    parts = [f"exact match {_modes(f['exact_match'])}"]
    english = f.get("english_contains_answer", {}).get("1")
    if english:
        parts.append(f"English with 1 document {_modes(english)}")
    if f.get("knowledge_contains_answer"):
        parts.append(f"knowledge {_modes(f['knowledge_contains_answer'])}")
    cost = f.get("cost", {}).get("4", {}).get("xrag_over_text", {})
    if cost:
        parts.append(f"xRAG/text prompt tokens at 4 documents {_x(cost.get('prompt_tokens'))}")
    return "; ".join(parts)


def _accuracy(f: dict[str, Any]) -> str:
    methods = f["methods"]
    parts = [
        f"{name} {methods[name]['mean']:.2f} (KV {methods[name]['kv_ratio']:.2f})"
        for name in ("full", "aim_merge_1/2", "aim_merge_1/4", "lookm_averaged@0.2")
        if name in methods
    ]
    return "held-out mean: " + ", ".join(parts)


HEADLINES: dict[str, Callable[[dict[str, Any]], str]] = {
    "serving": _serving,
    "load": _load,
    "compression": _compression,
    "compression-lengths": _compression,
    "retrieval": _retrieval,
    "autoscaling": _autoscaling,
    "lookm-scores": _lookm_scores,
    "fidelity": _fidelity,
    "batch": _batch,
    "xrag": _xrag,
    "accuracy": _accuracy,
}


def read_row(path: Path) -> Row | None:
    """A result file's row; ``None`` for a JSON that is not a benchmark result (a training record)."""
    payload = json.loads(path.read_text())
    name = payload.get("benchmark")
    if name is None or "figures" not in payload:
        return None
    machine = payload.get("machine") or {}
    load = machine.get("load_average")
    describe = HEADLINES.get(name)
    try:
        headline = describe(payload["figures"]) if describe else "(no summary for this benchmark)"
    except (KeyError, TypeError, IndexError) as e:  # an older layout of the figures
        headline = f"(figures in an older layout: {type(e).__name__} {e})"
    return Row(
        file=path.name,
        benchmark=name,
        date=str(payload.get("timestamp", "?"))[:10],
        commit=(machine.get("commit") or "not recorded")[:12],
        load=f"{load[0]:.1f}" if load else "not recorded",
        headline=headline,
    )


def read_rows(results_dir: Path = RESULTS_DIR) -> list[Row]:
    rows = (read_row(path) for path in sorted(results_dir.glob("*.json")))
    return [row for row in rows if row is not None]


def markdown(rows: list[Row]) -> str:
    lines = [
        "| result | date | commit | load | headline |",
        "|---|---|---|---|---|",
        *(f"| `{r.file}` | {r.date} | {r.commit} | {r.load} | {r.headline} |" for r in rows),
    ]
    return "\n".join(lines) + "\n"


def replace_section(document: str, table: str) -> str:
    """``document`` with the text between :data:`START` and :data:`END` replaced by ``table``."""
    head, found, rest = document.partition(START)
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise ValueError(f"the document has no {START!r} ... {END!r} section")
    return f"{head}{START}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmrag.benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="Directory of result JSONs.")
    parser.add_argument("--write", type=Path, default=None, help="Replace the report section of this Markdown file.")
    args = parser.parse_args(argv)
    table = markdown(read_rows(args.results))
    if args.write is None:
        print(table, end="")
    else:
        args.write.write_text(replace_section(args.write.read_text(), table))
        print(f"wrote the report section of {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
