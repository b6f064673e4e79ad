"""The LLM deployment autoscales on a local Serve: above its minimum under load, back to it after.

Reuses ``mmrag bench autoscaling`` (quick settings, longer bounded waits for a loaded machine); the load
is extended while no extra replica runs yet, and the wait for the minimum polls ``serve.status()``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest


@pytest.mark.slow
def test_llm_scales_up_under_load_and_back_down(tmp_path):
    pytest.importorskip("ray")
    from mmrag.benchmarks.autoscaling import QUICK, measure

    settings = replace(QUICK, load_s=8.0, load_max_s=180.0, settle_max_s=180.0)
    figures = measure(settings, tmp_path)

    assert figures["requests"]["ok"] > 0
    assert figures["requests"]["errors"] == 0, figures["requests"]
    assert figures["scaled_up"], f"never above {settings.min_replicas} replica(s): {figures['timeline'][-5:]}"
    assert figures["max_replicas_reached"] <= settings.max_replicas
    assert figures["scaled_down"], f"not back to the minimum: {figures['final_replicas']}"
    assert figures["final_replicas"] == {"RUNNING": settings.min_replicas}
