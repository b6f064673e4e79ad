"""``mmrag bench fidelity --quick`` runs end to end: every grid method, both variants, sane figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmrag.benchmarks import fidelity
from mmrag.kernels.reference.fidelity import default_grid
from mmrag.serving.cli.bench import parse_benchmark_args

FIELDS = {"top1_agreement", "mean_kl", "kv_ratio", "flops_ratio", "prefill_flops", "peak_mib", "peak_ratio"}


def test_peak_bytes_counts_live_tensors() -> None:
    import torch

    x = torch.ones(256, 256)
    # A kept 1 MiB tensor counts fully; a 256 KiB temporary freed inside counts at its peak.
    assert fidelity.peak_bytes(lambda: torch.empty(2**18)) == 2**20
    assert fidelity.peak_bytes(lambda: float((x * 2).sum())) >= 256 * 256 * 4


@pytest.mark.slow  # the real quick mode (2 prompts x 11 methods x 2 variants): 5-10 s here, more under load
def test_quick_bench_writes_every_method(tmp_path: Path) -> None:
    out = tmp_path / "fidelity.json"
    args = parse_benchmark_args("fidelity", ["--quick", "--out", str(out)])
    assert fidelity.run(args) == 0
    assert out.with_suffix(".png").stat().st_size > 0

    result = json.loads(out.read_text())
    assert result["benchmark"] == "fidelity"
    assert result["config"]["weights"] == "random" and "RANDOM-WEIGHT" in result["config"]["note"]
    figures = result["figures"]
    expected = ["full", *default_grid(2)]
    assert figures["methods"] == expected  # the run order; JSON objects come back key-sorted
    assert [p["images"] for p in figures["prompts"]] == list(fidelity.QUICK_IMAGES)
    assert set(figures["variants"]) == set(fidelity.VARIANTS)
    for variant, table in figures["variants"].items():
        assert set(table) == set(expected), variant
        full = table["full"]
        # The baseline against itself: exact.
        assert full["top1_agreement"] == 1.0 and full["mean_kl"] == 0.0
        assert full["kv_ratio"] == full["flops_ratio"] == full["peak_ratio"] == 1.0
        for name, row in table.items():
            assert set(row) >= FIELDS, name
            assert 0.0 <= row["top1_agreement"] <= 1.0 and row["mean_kl"] >= 0.0
            assert 0.0 < row["kv_ratio"] <= 1.0 and 0.0 < row["flops_ratio"] <= 1.0
            assert row["peak_mib"] > 0.0
        # Each method compresses something on these image-heavy prompts; only AIM shortens the prefill.
        for name in expected[1:]:
            assert table[name]["kv_ratio"] < 1.0, name
            assert (table[name]["flops_ratio"] < 1.0) == name.startswith("aim"), name
        assert table["aim-merge-25%"]["kv_ratio"] < table["aim-merge-50%"]["kv_ratio"]
        assert table["lookm-pivotal-0.1"]["kv_ratio"] < table["lookm-pivotal-0.3"]["kv_ratio"]
        assert table["lookm-pivotal-0.3"]["kv_ratio"] < table["lookm-pivotal-0.6"]["kv_ratio"]
        # Merging before the LLM shortens every tensor of the prefill: the peak falls.
        assert table["aim-merge-25%"]["peak_ratio"] < 1.0
