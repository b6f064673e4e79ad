"""The batch benchmark's request set and figures (its full run starts three engines: not a unit test)."""

from __future__ import annotations

import json

from mmrag.benchmarks.batch import make_bodies, summarise


def test_bodies_are_valid_greedy_chat_requests():
    from mmrag.serving.pipeline import parse_chat_body

    bodies = make_bodies(10, max_tokens=7)
    requests = [parse_chat_body(json.dumps(b).encode()) for b in bodies]
    assert all(r.temperature == 0 and r.max_tokens == 7 for r in requests)
    assert len({r.messages[0].content for r in requests}) == 10


def test_summarise_ratios_against_baselines():
    phases = {
        "mmrag_batch": {"requests": 100, "seconds": 2.0, "completion_tokens": 1600, "texts": ["a", "b"]},
        "vllm_llm_chat": {"requests": 100, "seconds": 1.0, "completion_tokens": 1600, "texts": ["a", "b"]},
        "server_one_by_one": {"requests": 10, "seconds": 2.0, "completion_tokens": 160},
    }
    figures = summarise(phases)
    assert figures["requests_per_s"] == {"mmrag_batch": 50.0, "vllm_llm_chat": 100.0, "server_one_by_one": 5.0}
    assert figures["batch_over_llm_chat"] == 0.5 and figures["batch_over_server"] == 10.0
    assert figures["outputs_match"] is True
    assert figures["completion_tokens_per_s"]["server_one_by_one"] == 80.0
