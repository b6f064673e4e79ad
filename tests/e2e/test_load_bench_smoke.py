"""Smoke test of `mmrag bench load` in a bounded form, against the session's server."""

from __future__ import annotations

import json

import pytest

from mmrag.benchmarks import load
from mmrag.serving.cli.bench import parse_benchmark_args

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_load_benchmark_bounded(server_url, tmp_path):
    out = tmp_path / "load.json"
    args = parse_benchmark_args(
        "load",
        ["--quick", "--out", str(out), "--url", server_url, "--probe-s", "3", "--load-s", "5", "--max-requests", "200"],
    )
    assert load.run(args) == 0
    figures = json.loads(out.read_text())["figures"]
    assert figures["capacity_rps"] > 0 and 0 < figures["sent"] <= 200
    assert figures["unexpected"] == 0 and figures["lost"] == 0
    assert figures["succeeded"] + figures["rejected"] == figures["sent"]
    assert figures["succeeded"] > 0
    assert out.with_suffix(".png").is_file()
