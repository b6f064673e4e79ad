"""Interleaved rounds and spreads shared by the benchmarks, and the batch benchmark's figures over rounds."""

from __future__ import annotations

import pytest

from mmrag.benchmarks import batch
from mmrag.benchmarks.common import shuffled_rounds, spread


def test_every_round_visits_every_name_once_in_a_seeded_order():
    names = ["stock", "aim", "lookm", "xrag"]
    order = shuffled_rounds(names, 8, seed=5)
    assert len(order) == 8 and all(sorted(r) == sorted(names) for r in order)
    assert len({r[0] for r in order}) > 1  # no name is always first
    assert shuffled_rounds(names, 8, seed=5) == order
    assert shuffled_rounds(names, 8, seed=6) != order


def test_spread_is_the_median_and_range():
    assert spread([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0}
    assert spread([]) is None


def _run(seconds: float, texts: list[str]) -> dict:
    return {"requests": 4, "seconds": seconds, "completion_tokens": 64, "texts": texts}


def test_batch_figures_are_medians_over_rounds_with_their_range(tmp_path):
    rounds = {
        "mmrag_batch": [_run(2.0, ["a"]), _run(1.0, ["a"]), _run(4.0, ["a"])],
        "vllm_llm_chat": [_run(1.0, ["a"]), _run(1.0, ["a"]), _run(3.0, ["a"])],
        "server_one_by_one": [_run(8.0, []), _run(6.0, []), _run(7.0, [])],
    }
    figures = batch.summarise({name: batch.merge_rounds(runs) for name, runs in rounds.items()})
    assert figures["requests_per_s"] == {"mmrag_batch": 2.0, "vllm_llm_chat": 4.0, "server_one_by_one": 4 / 7}
    assert figures["batch_over_llm_chat"] == pytest.approx(0.5)
    assert figures["phases"]["mmrag_batch"]["seconds_spread"] == {"median": 2.0, "min": 1.0, "max": 4.0}
    assert figures["phases"]["server_one_by_one"]["seconds_samples"] == [8.0, 6.0, 7.0]
    assert figures["outputs_match"] is True
    figures["orders"] = shuffled_rounds(list(rounds), 3, seed=0)
    batch._plot(tmp_path / "batch.png", figures)
    assert (tmp_path / "batch.png").stat().st_size > 0
