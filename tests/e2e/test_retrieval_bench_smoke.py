"""Smoke test of `mmrag bench retrieval` at toy sizes, with its chat ratio against the session server."""

from __future__ import annotations

import json

import pytest

from mmrag.benchmarks import retrieval
from mmrag.serving.cli.bench import parse_benchmark_args

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_retrieval_benchmark_small(server_url, tmp_path):
    out = tmp_path / "retrieval.json"
    args = parse_benchmark_args(
        "retrieval",
        [
            "--quick",
            "--out",
            str(out),
            "--chunks",
            "300",
            "--queries",
            "10",
            "--chat-url",
            f"{server_url}/v1",
            "--chat-requests",
            "2",
            "--http-files",
            "3",
        ],
    )
    assert retrieval.run(args) == 0
    figures = json.loads(out.read_text())["figures"]
    assert figures["chunks"] == 300 and figures["queries"] == 10
    assert 0.0 <= figures["recall_at_10"] <= 1.0
    assert figures["search_ms_p50"] > 0 and figures["ingest_chunks_per_s"] > 0
    assert figures["text_mode_latency_ratio"] > 0
    # Through the Files and Vector Stores APIs: the same chunks as ingesting directly, and the ratios.
    assert figures["http_chunks"] == figures["direct_chunks"] > 0
    assert figures["http_over_direct_search_p50"] > 0 and figures["http_over_direct_ingest_rate"] > 0
    assert out.with_suffix(".png").is_file()
