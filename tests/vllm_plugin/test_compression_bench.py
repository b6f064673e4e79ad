"""``mmrag bench compression --quick``: the three engines (stock vLLM, AIM, AIM + KV methods), every figure,
and the interleaved rounds' spread."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from mmrag.benchmarks import compression
from mmrag.serving.cli.bench import parse_benchmark_args


@pytest.mark.slow  # three vLLM engines on the tiny LLaVA
def test_quick_bench_compares_aim_and_lookm_with_stock(tmp_path: Path) -> None:
    out = tmp_path / "compression.json"
    args = parse_benchmark_args("compression", ["--quick", "--rounds", "2", "--warmup", "1", "--out", str(out)])
    assert compression.run(args) == 0
    assert out.with_suffix(".png").stat().st_size > 0
    figures = json.loads(out.read_text())["figures"]
    rows = figures["rows"]
    assert set(rows) == {"stock", *compression.AIM_RATIOS, *compression.kv_rows()}
    # The plugin at ratio 1 reads the stock prompt; 1/2 and 1/4 keep 8 and 4 of each image's 16 tokens.
    text_tokens = rows["stock"]["prompt_tokens"] - 4 * 16
    assert rows["aim@1"]["prompt_tokens"] == rows["stock"]["prompt_tokens"]
    assert rows["aim@1/2"]["prompt_tokens"] == text_tokens + 4 * 8
    assert rows["aim@1/4"]["prompt_tokens"] == text_tokens + 4 * 4
    # Observed in the scheduler at the last step: the prompt and 15 of the 16 generated tokens (the last
    # sampled token never enters the cache), fewer entries with LOOK-M.
    for name in ("stock", *compression.AIM_RATIOS):
        assert rows[name]["kv_tokens_per_request"] == rows[name]["prompt_tokens"] + 15
    for name in ("lookm", "random", "recent", "scores"):  # every registered KV method, chosen per request
        assert rows[name]["prompt_tokens"] == rows["stock"]["prompt_tokens"]
        assert rows[name]["kv_tokens_per_request"] < rows["stock"]["kv_tokens_per_request"]
    assert rows["aim@1/4+lookm"]["kv_tokens_per_request"] < rows["aim@1/4"]["kv_tokens_per_request"]
    # 1024-token pools: fewer, larger requests at once without compression.
    assert rows["aim@1/4"]["requests_in_kv_budget"] > rows["stock"]["requests_in_kv_budget"]
    assert rows["lookm"]["requests_in_kv_budget"] > rows["stock"]["requests_in_kv_budget"]
    # Every round visits every row once, in a shuffled order; each timed figure is the median of its samples.
    assert len(figures["orders"]) == 2
    assert all(sorted(order) == sorted(rows) for order in figures["orders"])
    for row in rows.values():
        assert row["ttft_ms"] > 0 and row["throughput_tokens_per_s"] > 0
        for key in compression.TIMED:
            spread = row["spread"][key]
            assert len(spread["samples"]) == 2
            values = [v for v in spread["samples"] if v is not None]
            assert row[key] == spread["median"] == statistics.median(values)
            assert spread["min"] == min(values) <= row[key] <= spread["max"] == max(values)
    assert rows["aim@1"]["vs_stock"]["ttft_ms"] == rows["aim@1"]["ttft_ms"] / rows["stock"]["ttft_ms"]
