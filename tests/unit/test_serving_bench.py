"""``mmrag bench serving`` without servers: statistics, validity, the load loop, SSE parsing, flags, plot."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import pytest

from mmrag.benchmarks import serving
from mmrag.benchmarks.serving import RequestRecord
from mmrag.serving.cli.bench import parse_benchmark_args


def test_percentile_interpolates_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert serving.percentile(values, 50) == pytest.approx(2.5)
    assert serving.percentile(values, 0) == 1.0 and serving.percentile(values, 100) == 4.0
    assert serving.percentile(values, 90) == pytest.approx(3.7)
    assert serving.percentile([], 50) is None


def test_in_flight_mean_weights_by_time():
    # Two requests over [0, 2): one all along, one for the second half -> 1.5 in flight on average.
    assert serving.in_flight_mean([(0.0, 2.0), (1.0, 2.0)], 0.0, 2.0) == pytest.approx(1.5)
    # Parts outside the window do not count.
    assert serving.in_flight_mean([(-5.0, 1.0), (1.0, 9.0)], 0.0, 2.0) == pytest.approx(1.0)
    assert serving.in_flight_mean([(0.0, 1.0)], 1.0, 1.0) == 0.0


def test_tpot_is_decode_time_per_token_after_the_first():
    record = RequestRecord(ok=True, ttft_s=0.1, e2e_s=0.5, tokens=5)
    assert record.tpot_s == pytest.approx(0.1)
    assert RequestRecord(ok=True, ttft_s=0.1, e2e_s=0.2, tokens=1).tpot_s is None
    assert RequestRecord(ok=False, error="HTTP 500").tpot_s is None


def test_summarize_point_marks_unreached_concurrency_and_errors_invalid():
    ok = [RequestRecord(ok=True, ttft_s=0.01 * i, e2e_s=0.1 * i, tokens=4, gaps_s=[0.02, 0.03]) for i in (1, 2, 3)]
    point = serving.summarize_point(ok, concurrency=4, wall_s=0.6, reached=3.9, loop_lag_s=[0.0, 0.001])
    assert point["valid"] and point["invalid_because"] == []
    assert point["ttft_s_p50"] == pytest.approx(0.02) and point["tbt_s_p50"] == pytest.approx(0.025)
    assert point["output_tokens"] == 12 and point["output_tokens_per_s"] == pytest.approx(20.0)
    assert point["output_tokens_per_request"] == [4]

    starved = serving.summarize_point(ok, concurrency=4, wall_s=0.6, reached=3.0, loop_lag_s=[])
    assert not starved["valid"] and "concurrency reached 3.00" in starved["invalid_because"][0]
    lagging = serving.summarize_point(ok, concurrency=4, wall_s=0.6, reached=4.0, loop_lag_s=[0.0, 0.2])
    assert not lagging["valid"] and "client starved" in lagging["invalid_because"][0]
    failed = serving.summarize_point([*ok, RequestRecord(ok=False, error="HTTP 503")], 4, 0.6, 4.0, [])
    assert not failed["valid"] and failed["errors"] == 1 and failed["error_kinds"] == ["HTTP 503"]


def test_server_cpu_is_per_output_token_and_absent_in_process():
    ok = [RequestRecord(ok=True, ttft_s=0.01, e2e_s=0.1, tokens=4) for _ in range(5)]
    point = serving.summarize_point(ok, 1, 1.0, 1.0, [], server_cpu_s=0.05)
    assert point["server_cpu_s"] == 0.05 and point["server_cpu_ms_per_token"] == pytest.approx(2.5)
    assert serving.summarize_point(ok, 1, 1.0, 1.0, [])["server_cpu_ms_per_token"] is None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux /proc")
def test_process_tree_cpu_counts_the_children():
    import subprocess
    import sys

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\ntime.sleep(60)",
        ]
    )
    try:
        own = serving.process_tree_cpu_s(child.pid)
        deadline = time.monotonic() + 60  # a bound against a hang on a loaded machine, not a timing check
        while own < 0.3 and time.monotonic() < deadline:
            time.sleep(0.1)
            own = serving.process_tree_cpu_s(child.pid)
        assert own >= 0.3  # the child's busy loop, read from /proc
        assert serving.process_tree_cpu_s(os.getpid()) >= own  # this process's tree holds the child
    finally:
        child.kill()
        child.wait()
    assert serving.process_tree_cpu_s(child.pid) == 0.0  # gone: nothing to count


def _point(system: str, concurrency: int, ttft: float, tokens_per_s: float, valid: bool = True) -> dict:
    point = dict.fromkeys(serving.METRICS, None)
    point.update(
        system=system,
        concurrency=concurrency,
        ttft_s_p50=ttft,
        output_tokens_per_s=tokens_per_s,
        valid=valid,
        concurrency_reached=float(concurrency),
        errors=0,
    )
    return point


def test_aggregate_takes_median_and_spread_over_rounds_and_ratios_against_vllm_serve():
    points = [
        _point("vllm-serve", 1, 0.010, 100),
        _point("vllm-serve", 1, 0.020, 120),
        _point("vllm-serve", 1, 0.030, 110),
        _point("mmrag", 1, 0.030, 90),
        _point("mmrag", 1, 0.010, 80, valid=False),
        _point("mmrag", 1, 0.020, 70),
    ]
    summary = serving.aggregate(points, ("mmrag", "vllm-serve"), (1, 4))
    ttft = summary["mmrag"]["1"]["ttft_s_p50"]
    assert ttft == {"median": 0.02, "min": 0.01, "max": 0.03}
    assert summary["mmrag"]["1"]["rounds"] == 3 and not summary["mmrag"]["1"]["all_valid"]
    assert "4" not in summary["mmrag"]  # no rounds at that concurrency: no row, not a row of Nones
    assert summary["mmrag"]["1"]["tbt_s_p50"] is None
    ratio = serving.ratios(summary)["mmrag/vllm-serve"]["1"]
    assert ratio["ttft_s_p50"] == pytest.approx(1.0)
    assert ratio["output_tokens_per_s"] == pytest.approx(80 / 110)
    assert ratio["tbt_s_p50"] is None


def test_plan_shuffles_every_round_with_the_seed():
    args = parse_benchmark_args("serving", ["--quick", "--rounds", "6", "--seed", "3"])
    settings = serving.settings_from(args)
    order = serving.plan(settings)
    assert len(order) == 6 and all(sorted(r) == sorted(serving.SYSTEMS) for r in order)
    assert len({tuple(r) for r in order}) > 1  # not always the same system first
    assert serving.plan(settings) == order  # the seed fixes it
    assert settings.concurrencies == (1, 4) and settings.requests_at(4) == 16 and settings.requests_at(1) == 8


def test_unknown_system_is_refused():
    args = parse_benchmark_args("serving", ["--systems", "mmrag,tgi"])
    with pytest.raises(SystemExit, match="tgi"):
        serving.settings_from(args)


def test_run_point_keeps_the_concurrency_and_counts_every_request():
    in_flight = 0
    peak = 0

    async def send(index: int) -> RequestRecord:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return RequestRecord(ok=True, ttft_s=0.001, e2e_s=0.01, tokens=2, gaps_s=[0.005])

    records, wall, reached, lags = asyncio.run(serving.run_point(send, concurrency=4, total=20))
    assert len(records) == 20 and peak == 4
    assert 3.6 <= reached <= 4.0 and wall > 0 and lags


def _sse(*events: object) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def _chunk(content: str | None = None, role: str | None = None, finish: str | None = None) -> dict:
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _stream_with(body: bytes, status: int = 200) -> RequestRecord:
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))

    async def go() -> RequestRecord:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await serving.http_stream(client, serving.chat_body("m", 3, 0))

    return asyncio.run(go())


def test_http_stream_counts_token_chunks_not_the_role_header_and_takes_usage():
    body = _sse(
        _chunk(role="assistant", content=""),
        _chunk("a"),
        _chunk(""),  # a token that decodes to no text still is a token chunk
        _chunk("c", finish="length"),
        {"choices": [], "usage": {"completion_tokens": 3}},
        "[DONE]",
    )
    record = _stream_with(body)
    assert record.ok and record.tokens == 3 and len(record.gaps_s) == 2
    assert 0 <= record.ttft_s <= record.e2e_s


def test_http_stream_failures_are_records_not_exceptions():
    assert _stream_with(b'{"error": {}}', status=503).error == "HTTP 503"
    assert _stream_with(_sse(_chunk("a"))).error == "stream ended without [DONE]"
    broken = _stream_with(_sse({"error": {"type": "internal_error", "message": "boom"}}))
    assert not broken.ok and "internal_error" in broken.error


def test_vllm_serve_flags_parse_back_to_the_same_engine_arguments(monkeypatch):
    pytest.importorskip("vllm")
    import huggingface_hub.constants

    # Offline (set by other tests' conftests), vLLM would resolve the absent /ckpt as a Hub repo id.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    kwargs = {
        "model": "/ckpt",
        "served_model_name": ["mmrag-tiny-llava"],
        "max_model_len": 2048,
        "dtype": "auto",
        "enforce_eager": True,
        "seed": 0,
        "limit_mm_per_prompt": {"image": 8},
        "disable_log_stats": False,
        "hf_overrides": {"architectures": ["AimLlavaForConditionalGeneration"], "aim_keep_ratio": 1.0},
    }
    flags = serving.vllm_serve_flags(kwargs)
    assert flags[:2] == ["--model", "/ckpt"] and "--enforce-eager" in flags
    serving.check_flags_round_trip(kwargs, flags)
    with pytest.raises(ValueError, match="max_model_len"):
        serving.check_flags_round_trip({**kwargs, "max_model_len": 4096}, flags)


def test_plot_writes_a_png(tmp_path):
    points = [_point(s, c, 0.01 * c, 100.0 / c) for s in serving.SYSTEMS for c in (1, 4) for _ in range(2)]
    for p in points:
        p["tbt_s_p50"] = 0.002
    settings = serving.settings_from(parse_benchmark_args("serving", ["--quick"]))
    figures = {"model": "tiny-random", "summary": serving.aggregate(points, serving.SYSTEMS, (1, 4))}
    path = tmp_path / "serving.png"
    serving.plot(figures, settings, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stage_breakdown_compares_the_ingress_histograms_with_the_client_over_the_same_requests():
    exposition = """# HELP mmrag_request_latency_seconds Time from request to last byte.
mmrag_request_latency_seconds_sum {latency}
mmrag_request_latency_seconds_count {count}
mmrag_time_to_first_token_seconds_sum {ttft}
mmrag_time_to_first_token_seconds_count {count}
mmrag_requests_in_flight 0.0
"""
    before = serving.mmrag_stage_metrics(exposition.format(latency=1.0, ttft=0.5, count=4))
    after = serving.mmrag_stage_metrics(exposition.format(latency=3.0, ttft=0.7, count=14))
    assert before["mmrag_request_latency_seconds_count"] == 4.0
    points = [
        {"requests": 4, "errors": 0, "ttft_s_mean": 0.01, "e2e_s_mean": 0.1},
        {"requests": 6, "errors": 0, "ttft_s_mean": 0.04, "e2e_s_mean": 0.3},
    ]
    stage = serving.stage_breakdown(before, after, {"points": points})
    assert stage["ingress_requests"] == 10 and stage["client_requests"] == 10
    assert stage["ingress_latency_s_mean"] == pytest.approx(0.2) and stage["ingress_ttft_s_mean"] == pytest.approx(0.02)
    assert stage["client_ttft_s_mean"] == pytest.approx(0.028) and stage["client_e2e_s_mean"] == pytest.approx(0.22)


def test_mmrag_server_starts_mmrag_serve_with_the_models_overrides_on_the_benchs_cache(monkeypatch, tmp_path):
    """What the e2e smoke test leaves out (its "mmrag" is the package's running server): the command line."""
    from mmrag.serving.cli import serve
    from mmrag.serving.paths import cache_dir

    calls = []
    monkeypatch.setattr(serving, "server_process", lambda *args: calls.append(args) or "started")
    overrides = ("model.name=tiny-random", *serving.MMRAG_OVERRIDES)
    model = serving.Model(
        name="tiny-random",
        checkpoint=tmp_path,
        served_name="m",
        engine_kwargs={},
        chat_template="",
        kv_cache_space_gib=1,
        overrides=overrides,
    )
    log = tmp_path / "mmrag.log"
    extra = serving.MMRAG_VARIANTS["mmrag-proxy-actor"]
    assert serving.mmrag_server(model, log, 7.0, extra) == "started"
    ((name, command, env, log_path, timeout_s),) = calls
    assert (name, log_path, timeout_s) == ("mmrag serve", log, 7.0)
    assert command[1:4] == ["-m", "mmrag.serving.cli", "serve"]
    assert env["MMRAG_CACHE_DIR"] == str(cache_dir()) and env["RAY_SERVE_PROXY_USE_GRPC"] == "0"
    # `mmrag serve` parses the same command (with server_process's host and port) into the bench's settings.
    assert command[3] == "serve"
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    config = serve.config_from_args(parser.parse_args([*command[4:], "--host", "127.0.0.1", "--port", "8000"]))
    assert config.model.name == "tiny-random" and config.retrieval.default_mode == "none"
    assert config.retrieval.ingest_demo_corpus is False and config.server.port == 8000
