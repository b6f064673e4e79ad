"""``mmrag bench compression --quick``: per family, the three engines (stock vLLM, AIM, AIM + KV methods),
every figure, and the interleaved rounds' spread.

The smoke runs LLaVA and one more family, LLaVA-OneVision, at its quick (smallest) size: the cheaper of the two
new families in the committed run (60 s against Qwen2.5-VL's 86 s, 3 rounds, load 5-6). With these arguments
it adds 31 s to LLaVA's 76 s (the run 113 s, load 5.8; the test 168 s at load 5). Qwen2.5-VL's rows take the
same code path (``--families`` picks the checkpoint, the prompt and the engine arguments) and are measured
in the committed quick run of all three families, not here.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from mmrag.benchmarks import compression
from mmrag.serving.cli.bench import parse_benchmark_args

IMAGES = 4
# Quick checkpoints' visual tokens per image: LLaVA 56 px, 16; LLaVA-OneVision 56 px, base view 16 + one
# 4x4 tile 16 + 4 newlines.
VISUAL = {"llava": 16, "llava-onevision": 36}


@pytest.mark.slow  # per family three vLLM engines on a tiny checkpoint
def test_quick_bench_compares_aim_and_lookm_with_stock_per_family(tmp_path: Path) -> None:
    out = tmp_path / "compression.json"
    argv = ["--quick", "--families", "llava,llava-onevision", "--rounds", "2", "--warmup", "1", "--out", str(out)]
    args = parse_benchmark_args("compression", argv)
    assert compression.run(args) == 0
    assert out.with_suffix(".png").stat().st_size > 0
    result = json.loads(out.read_text())
    assert result["config"]["families"] == ["llava", "llava-onevision"]
    families = result["figures"]["families"]
    assert set(families) == {"llava", "llava-onevision"}
    for name, figures in families.items():
        rows = figures["rows"]
        kv_methods = None if name == "llava" else ("lookm",)
        assert set(rows) == {"stock", *compression.AIM_RATIOS, *compression.kv_rows(kv_methods)}  # JSON keys sorted
        visual = VISUAL[name]
        assert figures["visual_tokens_per_image"] == visual  # measured: stock's prompt minus the text
        # The plugin at ratio 1 reads the stock prompt; 1/2 and 1/4 keep ceil(T x ratio) of each image's T.
        text_tokens = rows["stock"]["prompt_tokens"] - IMAGES * visual
        assert rows["aim@1"]["prompt_tokens"] == rows["stock"]["prompt_tokens"]
        for row, ratio in (("aim@1/2", 0.5), ("aim@1/4", 0.25)):
            assert rows[row]["prompt_tokens"] == text_tokens + IMAGES * math.ceil(visual * ratio)
        # Observed in the scheduler at the last step: the prompt and 15 of the 16 generated tokens (the last
        # sampled token never enters the cache), fewer entries with a KV method.
        for row in ("stock", *compression.AIM_RATIOS):
            assert rows[row]["kv_tokens_per_request"] == rows[row]["prompt_tokens"] + 15
        for row in compression.kv_rows(kv_methods):  # every KV method of the family, chosen per request
            if row != "aim@1/4+lookm":
                assert rows[row]["prompt_tokens"] == rows["stock"]["prompt_tokens"]
                assert rows[row]["kv_tokens_per_request"] < rows["stock"]["kv_tokens_per_request"]
        assert rows["aim@1/4+lookm"]["kv_tokens_per_request"] < rows["aim@1/4"]["kv_tokens_per_request"]
        # 1024-token pools: fewer, larger requests at once without compression.
        assert rows["aim@1/4"]["requests_in_kv_budget"] > rows["stock"]["requests_in_kv_budget"]
        assert rows["lookm"]["requests_in_kv_budget"] > rows["stock"]["requests_in_kv_budget"]
        # Every round visits every row of the family once, in a shuffled order; each timed figure is the
        # median of its samples, its ratio against the family's own stock.
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
        memory = figures["memory"]
        assert 0 < memory["rss_gib_before_engines"] <= result["config"]["peak_rss_gib"]
        assert 0 < memory["rss_gib_engines_started"] <= result["config"]["peak_rss_gib"]


def test_families_option_validates_names() -> None:
    args = parse_benchmark_args("compression", ["--quick"])
    assert args.families == list(compression.FAMILIES)
    args = parse_benchmark_args("compression", ["--families", "qwen2.5-vl, llava,qwen2.5-vl"])
    assert args.families == ["qwen2.5-vl", "llava"]
    with pytest.raises(SystemExit):
        parse_benchmark_args("compression", ["--families", "llava,gemma"])


def test_context_tokens_and_methods_options() -> None:
    args = parse_benchmark_args("compression", ["--context-tokens", "8192, 2048,8192", "--methods", "lookm,lookm"])
    assert args.context_tokens == [2048, 8192]  # sorted, deduplicated
    assert args.methods == ["lookm"]
    assert parse_benchmark_args("compression", []).context_tokens is None
    for bad in ("0,2048", "2k", ","):
        with pytest.raises(SystemExit):
            parse_benchmark_args("compression", ["--context-tokens", bad])


def test_methods_pick_rows_and_engines() -> None:
    llava = compression.family("llava", quick=True)
    every = compression.row_groups(llava, None)
    assert set(every) == {"stock", "plugin", "kv"}
    chosen = compression.row_groups(llava, ["lookm", "aim@1/4+lookm"])
    # No AIM-only row asked for: the plugin engine is not started; stock always is.
    assert {kind: set(rows) for kind, rows in chosen.items()} == {
        "stock": {"stock"},
        "kv": {"lookm", "aim@1/4+lookm"},
    }
    assert set(compression.row_groups(llava, ["aim@1/2"])) == {"stock", "plugin"}
    onevision = compression.family("llava-onevision", quick=True)
    with pytest.raises(ValueError, match="random"):  # LLaVA-OneVision has lookm rows only
        compression.row_groups(onevision, ["random"])


def test_a_length_sets_images_and_a_pool_of_whole_prompts() -> None:
    args = parse_benchmark_args("compression", ["--context-tokens", "2048,8192"])
    compression._fill_defaults(args)
    llava = compression.family("llava", quick=False)  # 256 visual tokens per image
    at = compression.at_length(args, llava, 8192)
    assert at.images == 32 and args.images == 8  # a copy: the sweep's own arguments are left alone
    whole = 256 + 64 + 32 * 256  # text allowance, the longest decode (capacity's 64), the images
    assert at.kv_budget_tokens == (args.concurrent * math.ceil(whole / 32) + 1) * 32
    assert compression.at_length(args, llava, 100).images == 1
    # A pool larger than the lengths need stays.
    args.kv_budget_tokens = 10**6
    assert compression.at_length(args, llava, 2048).kv_budget_tokens == 10**6


def test_lengths_markdown_orders_lengths_numerically_and_stock_first() -> None:
    def row(ttft: float, ratio: float | None) -> dict:
        figures = {key: None for key in compression.TIMED}
        spread = {key: {"median": None, "min": None, "max": None} for key in compression.TIMED}
        figures["ttft_ms"], spread["ttft_ms"] = ttft, {"median": ttft, "min": ttft - 1, "max": ttft + 1}
        return {"prompt_tokens": 10, **figures, "spread": spread, "vs_stock": {"ttft_ms": ratio}}

    lengths = {
        tokens: {"images_per_request": images, "rows": {"lookm": row(30.0, 1.5), "stock": row(20.0, 1.0)}}
        for tokens, images in (("8192", 32), ("2048", 8))
    }
    lines = compression.lengths_markdown({"lengths": lengths}, 4).splitlines()
    assert [line.split(" | ")[:2] for line in lines[2:]] == [
        ["| 2048 (8)", "stock"],
        ["| 2048 (8)", "lookm"],
        ["| 8192 (32)", "stock"],
        ["| 8192 (32)", "lookm"],
    ]
    assert "| 30 [29-31] (1.50x) | no sample |" in lines[3]
