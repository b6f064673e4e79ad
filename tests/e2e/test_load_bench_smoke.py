"""Smoke test of `mmrag bench load` in a bounded form, against the session's server."""

from __future__ import annotations

import json

import pytest

from mmrag.benchmarks import load
from mmrag.serving.cli.bench import parse_benchmark_args

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_load_benchmark_bounded(server_url, tmp_path):
    out = tmp_path / "load.json"
    bounds = ["--probe-s", "3", "--load-s", "5", "--max-requests", "200", "--baseline-s", "1"]
    hostile = ["--hostile", "--hostile-connections", "2"]
    args = parse_benchmark_args("load", ["--quick", "--out", str(out), "--url", server_url, *bounds, *hostile])
    assert load.run(args) == 0
    figures = json.loads(out.read_text())["figures"]
    assert figures["capacity_rps"] > 0 and 0 < figures["sent"] <= 200
    assert figures["unexpected"] == 0 and figures["lost"] == 0
    assert figures["succeeded"] + figures["rejected"] == figures["sent"]
    assert figures["succeeded"] > 0
    assert figures["unloaded_requests"] >= 5 and figures["p99_vs_unloaded"] > 0
    # The hostile clients were refused (4xx), shed with the load (503), cut off or still waiting; no other 5xx.
    hostile = figures["hostile"]
    assert set(hostile["huge_query"]) <= {"400", "503"} and "400" in hostile["huge_query"], hostile
    assert sum(hostile["large_image"].values()) > 0 and sum(hostile["slow_body"].values()) > 0, hostile
    statuses = [status for counts in hostile.values() for status in counts]
    assert not [s for s in statuses if s.startswith("5") and s != "503"], hostile
    assert out.with_suffix(".png").is_file()
