"""``mmrag bench compression --quick``: both engines (stock vLLM and the plugin) and every figure written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmrag.benchmarks import compression
from mmrag.serving.cli.bench import parse_benchmark_args


@pytest.mark.slow  # two vLLM engines on the tiny LLaVA (about a minute here)
def test_quick_bench_compares_aim_with_stock(tmp_path: Path) -> None:
    out = tmp_path / "compression.json"
    args = parse_benchmark_args("compression", ["--quick", "--rounds", "2", "--out", str(out)])
    assert compression.run(args) == 0
    assert out.with_suffix(".png").stat().st_size > 0
    rows = json.loads(out.read_text())["figures"]["rows"]
    assert set(rows) == {"stock", *compression.AIM_RATIOS}
    # The plugin at ratio 1 reads the stock prompt; 1/2 and 1/4 keep 8 and 4 of each image's 16 tokens.
    text_tokens = rows["stock"]["prompt_tokens"] - 4 * 16
    assert rows["aim@1"]["prompt_tokens"] == rows["stock"]["prompt_tokens"]
    assert rows["aim@1/2"]["prompt_tokens"] == text_tokens + 4 * 8
    assert rows["aim@1/4"]["prompt_tokens"] == text_tokens + 4 * 4
    assert rows["aim@1/4"]["requests_in_kv_budget"] > rows["stock"]["requests_in_kv_budget"]
    for row in rows.values():
        assert row["ttft_ms"] > 0 and row["throughput_tokens_per_s"] > 0
        assert row["kv_tokens_per_request"] == row["prompt_tokens"] + 8
