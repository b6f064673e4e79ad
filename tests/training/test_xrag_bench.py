"""``mmrag bench xrag --quick`` end to end on the shipped trained model and its projector (vLLM), small sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmrag.benchmarks import xrag
from mmrag.serving.cli.bench import parse_benchmark_args


@pytest.mark.slow  # one vLLM engine, 4 knowledge tasks, 4 English questions, 1 prompt per cost point
def test_quick_bench_writes_every_mode_and_question_set(tmp_path: Path) -> None:
    out = tmp_path / "xrag.json"
    argv = ["--quick", "--tasks", "4", "--english", "4", "--repeats", "1", "--out", str(out)]
    assert xrag.run(parse_benchmark_args("xrag", argv)) == 0
    assert out.with_suffix(".png").stat().st_size > 0
    figures = json.loads(out.read_text())["figures"]
    assert set(figures["exact_match"]) == set(figures["knowledge_contains_answer"]) == set(xrag.MODES)
    english = figures["english_contains_answer"]
    assert set(english) == {str(c) for c in xrag.ENGLISH_DOCUMENT_COUNTS}
    assert all(set(row) == set(xrag.MODES) and all(0 <= v <= 1 for v in row.values()) for row in english.values())
    for count in xrag.DOCUMENT_COUNTS:
        row = figures["cost"][str(count)]
        # One token per document instead of its text: xRAG's prompt is shorter from the first document on.
        assert row["xrag"]["prompt_tokens"] < row["text"]["prompt_tokens"], row
        assert row["none"]["prompt_tokens"] < row["xrag"]["prompt_tokens"], row
        assert row["xrag_over_text"]["ttft"] > 0, row
    four, eight = figures["cost"]["4"], figures["cost"]["8"]
    # Four more documents: framing plus one placeholder each in xRAG, whole documents as text.
    assert (
        eight["xrag"]["prompt_tokens"] - four["xrag"]["prompt_tokens"]
        < (eight["text"]["prompt_tokens"] - four["text"]["prompt_tokens"]) / 2
    )
