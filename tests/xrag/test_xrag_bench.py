"""``mmrag bench xrag --quick`` end to end: one vLLM engine with the shipped projector, every figure written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmrag.benchmarks import xrag
from mmrag.serving.cli.bench import parse_benchmark_args


@pytest.mark.slow  # one vLLM engine, 8 tasks x 3 modes, 2 prompts per cost point (about half a minute here)
def test_quick_bench_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "xrag.json"
    args = parse_benchmark_args("xrag", ["--quick", "--tasks", "8", "--repeats", "2", "--out", str(out)])
    assert xrag.run(args) == 0
    assert out.with_suffix(".png").stat().st_size > 0
    figures = json.loads(out.read_text())["figures"]
    assert set(figures["exact_match"]) == set(xrag.MODES)
    assert all(0.0 <= v <= 1.0 for v in figures["exact_match"].values())
    for count in xrag.DOCUMENT_COUNTS:
        row = figures["cost"][str(count)]
        # one token per document in xRAG, tens as text
        assert row["none"]["prompt_tokens"] < row["xrag"]["prompt_tokens"] < row["text"]["prompt_tokens"]
        assert row["xrag_over_text"]["ttft"] > 0
    four, eight = figures["cost"]["4"], figures["cost"]["8"]
    # Four more documents: framing plus one placeholder each in xRAG, whole documents as text.
    assert (
        eight["xrag"]["prompt_tokens"] - four["xrag"]["prompt_tokens"]
        < (eight["text"]["prompt_tokens"] - four["text"]["prompt_tokens"]) / 2
    )
