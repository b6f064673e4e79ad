"""``mmrag bench accuracy --quick`` end to end on the shipped trained model: every row, vLLM included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmrag.benchmarks import accuracy
from mmrag.serving.cli.bench import parse_benchmark_args
from mmrag.training.tasks import IMAGE_FAMILIES


@pytest.mark.slow  # 1 task x 4 image families x 15 reference rows, plus two vLLM engines (about 50 s idle)
def test_quick_bench_writes_every_row(tmp_path: Path) -> None:
    """Every row is written, in order of the compression each applies; one task per family is enough for
    that (the rows' accuracies are the full run's business, docs/results.md)."""
    out = tmp_path / "accuracy.json"
    args = parse_benchmark_args("accuracy", ["--quick", "--per-family", "1", "--out", str(out)])
    assert accuracy.run(args) == 0
    assert out.with_suffix(".png").stat().st_size > 0
    result = json.loads(out.read_text())
    rows = result["figures"]["methods"]
    assert set(rows) == set(accuracy.method_grid(quick=True)) | set(accuracy.VLLM_ROWS)
    for name, row in rows.items():
        assert set(row["accuracy"]) == set(IMAGE_FAMILIES), name
        assert 0.0 <= row["mean"] <= 1.0 and 0.0 < row["kv_ratio"] <= 1.0, name
    assert rows["full"]["kv_ratio"] == 1.0
    # Fewer entries where a method compresses: merged prompts, and the 20% image budget.
    assert rows["aim_merge_1/4"]["kv_ratio"] < rows["aim_merge_1/2"]["kv_ratio"] < 1.0
    # Spreading moves positions, not entries: the same cache as the contiguous merge.
    assert rows["aim_spread_1/2"]["kv_entries"] == rows["aim_merge_1/2"]["kv_entries"]
    assert rows["vllm_aim_spread_1/4"]["kv_entries"] == rows["vllm_aim_merge_1/4"]["kv_entries"]
    assert rows["vllm_aim_merge_1/4"]["kv_ratio"] < rows["vllm_full"]["kv_ratio"] == 1.0
    assert rows["lookm_pivotal@0.2"]["kv_ratio"] == rows["random@0.2"]["kv_ratio"] < 1.0
    assert set(result["figures"]["knowledge"]) == {"with_documents", "without_documents"}
