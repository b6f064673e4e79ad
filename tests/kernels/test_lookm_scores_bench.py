"""The LOOK-M score memory benchmark runs end to end on small sizes (figures are not asserted: no timing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmrag.benchmarks import lookm_scores
from mmrag.serving.cli.bench import parse_benchmark_args


@pytest.mark.slow  # four fresh Python processes: about 15 s here
def test_bench_writes_figures_and_agrees_across_methods(tmp_path: Path) -> None:
    out = tmp_path / "lookm-scores.json"
    args = parse_benchmark_args(
        "lookm-scores",
        [
            "--lengths",
            "128,256",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--head-dim",
            "16",
            "--chunk-size",
            "48",
            "--out",
            str(out),
        ],
    )
    assert lookm_scores.run(args) == 0
    result = json.loads(out.read_text())
    figures = result["figures"]
    assert figures["lengths"] == [128, 256]
    assert set(figures["peak_mib"]) >= {"dense", "chunked"}
    assert all(len(v) == 2 for v in figures["peak_mib"].values())
    # Separate processes, same seeded inputs: the chunked scores equal the dense ones.
    assert figures["checksum_rel_diff"]["chunked"] < 1e-5
    assert result["config"]["chunk_size"] == 48
