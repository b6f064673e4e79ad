"""Smoke test of `mmrag bench serving` at its smallest: tiny-random, one round, concurrency 1, two requests.

Its "mmrag" system is this package's tiny server (the same `mmrag serve` on the same seeded tiny-random
checkpoint, already started for the other tests): starting a second Ray Serve app here was most of this test's
time. vLLM's OpenAI server and the in-process AsyncLLM it starts itself, one at a time. How the bench would
start `mmrag serve` itself (its command line, its overrides) is tests/unit/test_serving_bench.py's.
"""

from __future__ import annotations

import contextlib
import json

import pytest

from mmrag.benchmarks import serving
from mmrag.serving.cli.bench import parse_benchmark_args

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def mmrag_is_the_package_server(tiny_server, monkeypatch):
    started = []

    @contextlib.contextmanager
    def package_server(model, log_path, timeout_s, extra_env=None):
        assert extra_env is None  # plain mmrag only: a variant would need its own environment
        log_path.write_text(f"the e2e package's tiny server at {tiny_server.url} (pid {tiny_server.pid})\n")
        started.append(model.name)
        yield tiny_server

    monkeypatch.setattr(serving, "mmrag_server", package_server)
    return started


def test_serving_benchmark_smallest(tmp_path, mmrag_is_the_package_server):
    out = tmp_path / "serving.json"
    bounds = ["--rounds", "1", "--concurrency", "1", "--min-requests", "2", "--requests-per-worker", "1"]
    bounds += ["--warmup", "1"]
    args = parse_benchmark_args("serving", ["--quick", "--out", str(out), "--max-tokens", "8", *bounds])
    assert serving.run(args) == 0
    assert mmrag_is_the_package_server == ["tiny-random"]
    result = json.loads(out.read_text())
    figures = result["figures"]
    assert figures["failures"] == []
    assert sorted(p["system"] for p in figures["points"]) == sorted(serving.SYSTEMS)
    for point in figures["points"]:
        assert point["requests"] == 2 and point["errors"] == 0, point
        assert point["ttft_s_p50"] > 0 and point["e2e_s_p50"] >= point["ttft_s_p50"], point
    # Greedy decoding of one prompt on the same checkpoint: every system decodes the same tokens.
    counts = {p["system"]: p["output_tokens_per_request"] for p in figures["points"]}
    assert len({tuple(c) for c in counts.values()}) == 1, counts
    assert set(figures["ratios"]) == {"mmrag/vllm-serve", "asyncllm/vllm-serve"}
    assert figures["ratios"]["mmrag/vllm-serve"]["1"]["ttft_s_p50"] > 0
    # The ingress's histograms moved by exactly the measured requests (the package server's /metrics).
    (stage,) = figures["mmrag_stage"]
    assert stage["ingress_requests"] == stage["client_requests"] == 2, stage
    assert "--max-model-len" in figures["vllm_serve_flags"]
    assert result["machine"]["load_average"] is not None and result["machine"]["commit"]
    assert out.with_suffix(".png").is_file()
