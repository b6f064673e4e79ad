"""Smoke test of `mmrag bench serving` at its smallest: tiny-random, one round, concurrency 1, two requests.

It starts each system itself (mmrag serve, vLLM's OpenAI server, in-process AsyncLLM), one at a time, so it
does not use the session's server; about three minutes on two cores, most of it mmrag serve's start.
"""

from __future__ import annotations

import json

import pytest

from mmrag.benchmarks import serving
from mmrag.serving.cli.bench import parse_benchmark_args

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_serving_benchmark_smallest(tmp_path):
    out = tmp_path / "serving.json"
    bounds = ["--rounds", "1", "--concurrency", "1", "--min-requests", "2", "--requests-per-worker", "1"]
    bounds += ["--warmup", "1"]
    args = parse_benchmark_args("serving", ["--quick", "--out", str(out), "--max-tokens", "8", *bounds])
    assert serving.run(args) == 0
    result = json.loads(out.read_text())
    figures = result["figures"]
    assert figures["failures"] == []
    assert sorted(p["system"] for p in figures["points"]) == sorted(serving.SYSTEMS)
    for point in figures["points"]:
        assert point["requests"] == 2 and point["errors"] == 0, point
        assert point["ttft_s_p50"] > 0 and point["e2e_s_p50"] >= point["ttft_s_p50"], point
    # Greedy decoding of one prompt with one set of engine arguments: every system decodes the same tokens.
    counts = {p["system"]: p["output_tokens_per_request"] for p in figures["points"]}
    assert len({tuple(c) for c in counts.values()}) == 1, counts
    assert set(figures["ratios"]) == {"mmrag/vllm-serve", "asyncllm/vllm-serve"}
    assert figures["ratios"]["mmrag/vllm-serve"]["1"]["ttft_s_p50"] > 0
    assert "--max-model-len" in figures["vllm_serve_flags"]
    assert result["machine"]["load_average"] is not None and result["machine"]["commit"]
    assert out.with_suffix(".png").is_file()
