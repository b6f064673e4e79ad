"""``mmrag bench load``: the server under about twice its capacity, on loopback, bounded in time and count.

1. Capacity: closed-loop clients (as many as the LLM stage runs at once) for ``--probe-s`` seconds give
   the sustainable request rate of this server on this machine.
2. Load: open-loop Poisson arrivals at ``--overload`` x that rate for ``--load-s`` seconds, at most
   ``--max-requests`` requests, each with a client timeout (``achieved_rps`` is what the client really
   sent: on a shared 2-core machine it can fall behind the schedule). Every request ends in one bucket:
   ``succeeded`` (200 with a completion), ``rejected`` (429/503: shed by a full queue, the designed
   behaviour; ``rejected_with_retry_after`` counts those carrying ``Retry-After``), ``unexpected``
   (any other status or a malformed body: target 0) or ``lost`` (no answer: connection error or client
   timeout: target 0).
3. Over time: latency percentiles of the succeeded requests and the server's memory (RSS of
   ``mmrag serve`` and all its descendants: Ray, replicas, vLLM engine processes).

Before the load, one client alone measures the unloaded latency of the same small request; the load's
p99 is reported as a ratio to it. ``offered_reached`` says whether the client really sent at least 0.9x the
scheduled rate (on a shared machine it may not: then the point does not show overload). ``--hostile`` runs
the clients of ``benchmarks/hostile.py`` (slow bodies and headers, large images, huge queries) beside the
load, and reports how each of their attempts ended.

By default the benchmark starts its own server with small queues (so that shedding really happens) and
stops it afterwards; ``--url`` measures a running server instead (no memory figures then).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import time
from pathlib import Path
from typing import Any

from mmrag.benchmarks.hostile import HostileMix

HELP = "Load at ~2x capacity on loopback: succeeded / shed / unexpected / lost, latency and memory."

MODEL = "mmrag-tiny-llava"
# Small queues, so that twice the capacity overflows them: shedding must show as 503s, not as waits.
SERVER_OVERRIDES = [
    "model.name=tiny-random",  # the server's own capacity: the smallest model keeps the engine out of the way
    "retrieval.default_mode=none",  # chat alone, as measured before retrieval was on by default
    "deployments.llm.max_ongoing_requests=4",
    "deployments.llm.max_queued_requests=4",
    "deployments.ingress.max_ongoing_requests=32",
    "deployments.ingress.max_queued_requests=16",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="A running server (http://host:port); default: start one.")
    parser.add_argument("--probe-s", type=float, default=None, help="Capacity probe seconds (20; quick 8).")
    parser.add_argument("--load-s", type=float, default=None, help="Load seconds (60; quick 15).")
    parser.add_argument("--overload", type=float, default=2.0, help="Offered rate / measured capacity.")
    parser.add_argument("--max-requests", type=int, default=2000, help="Hard cap on requests sent.")
    parser.add_argument("--concurrency", type=int, default=4, help="Closed-loop clients of the probe.")
    parser.add_argument("--max-tokens", type=int, default=16, help="Completion tokens per request.")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="Client timeout per request.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-s", type=float, default=None, help="Unloaded latency seconds (10; quick 5).")
    parser.add_argument("--hostile", action="store_true", help="Hostile clients beside the load (see hostile.py).")
    parser.add_argument("--hostile-connections", type=int, default=8, help="Slow sockets per slow kind.")
    parser.add_argument(
        "--client-cpus",
        default="auto",
        help="Cores of the load generator (auto: the last; none); a server the benchmark starts gets the others.",
    )


def run(args: argparse.Namespace) -> int:
    from mmrag.benchmarks.common import client_cpus, other_cpus, pinned, plot_path, write_result

    client = client_cpus(args.client_cpus)
    server = None if args.url else other_cpus(client)
    probe_s = args.probe_s or (8.0 if args.quick else 20.0)
    load_s = args.load_s or (15.0 if args.quick else 60.0)
    args.baseline_s = args.baseline_s or (5.0 if args.quick else 10.0)
    if args.url:
        with pinned(client):
            result = asyncio.run(measure(args.url, None, args, probe_s, load_s))
    else:
        from mmrag.serving.server_process import running_server

        # The server (Ray, replicas, vLLM's engine: every process it starts inherits the mask) stays off the
        # client's core: sharing the cores, a client that falls behind sends late and reads late, and its own
        # delays would be counted as the server's latency.
        with contextlib.ExitStack() as stack:
            with pinned(server):
                running = stack.enter_context(running_server(overrides=SERVER_OVERRIDES))
            with pinned(client):
                result = asyncio.run(measure(running.url, running.pid, args, probe_s, load_s))
    config = {
        "quick": args.quick,
        "url": args.url or "started by the benchmark",
        "server_overrides": None if args.url else SERVER_OVERRIDES,
        "probe_s": probe_s,
        "load_s": load_s,
        "overload": args.overload,
        "max_requests": args.max_requests,
        "probe_concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "timeout_s": args.timeout_s,
        "seed": args.seed,
        "baseline_s": args.baseline_s,
        "hostile": args.hostile,
        "hostile_connections": args.hostile_connections if args.hostile else None,
        "client_cpus": client,
        "server_cpus": server,
    }
    path = write_result("load", result, config, args.out)
    _plot(result, plot_path(path))
    keys = ("capacity_rps", "offered_rps", "achieved_rps", "offered_reached", "sent", "succeeded", "rejected")
    for key in (*keys, "unexpected", "lost", "unloaded_latency_s_p99", "latency_s_p99", "p99_vs_unloaded"):
        print(f"{key}: {result[key]}")
    if args.hostile:
        print(f"hostile: {result['hostile']}")
    print(f"wrote {path} and {plot_path(path)}")
    return 0 if result["unexpected"] == 0 and result["lost"] == 0 else 1


async def measure(url: str, pid: int | None, args: argparse.Namespace, probe_s: float, load_s: float) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout_s, limits=limits) as client:
        capacity = await probe_capacity(client, args, probe_s)
        unloaded = await unloaded_latencies(client, args, args.baseline_s)
        rate = capacity * args.overload
        memory: list[tuple[float, float]] = []
        sampler = asyncio.create_task(sample_memory(pid, memory)) if pid else None
        hostile = HostileMix(model=MODEL, connections=args.hostile_connections) if args.hostile else None
        mix = asyncio.create_task(hostile.run(url, client, load_s)) if hostile else None
        outcomes = await offer_load(client, args, rate, load_s)
        if mix:
            await mix
        if sampler:
            sampler.cancel()
    figures = summarize(outcomes)
    span = max((o["t"] for o in outcomes), default=0.0) or 1.0
    # The client shares the machine: if it could not send on schedule, the achieved rate says so.
    achieved = len(outcomes) / span
    figures.update(capacity_rps=capacity, offered_rps=rate, achieved_rps=achieved, memory_timeline=memory)
    figures["offered_reached"] = achieved >= 0.9 * rate
    figures["unloaded_requests"] = len(unloaded)
    figures["unloaded_latency_s_p50"] = _percentile(unloaded, 50)
    figures["unloaded_latency_s_p99"] = _percentile(unloaded, 99)
    loaded, alone = figures["latency_s_p99"], figures["unloaded_latency_s_p99"]
    figures["p99_vs_unloaded"] = loaded / alone if loaded and alone else None
    figures["hostile"] = hostile.summary() if hostile else None
    if memory:
        figures["memory_peak_mib"] = max(m for _, m in memory)
    return figures


async def probe_capacity(client, args: argparse.Namespace, seconds: float) -> float:
    """Requests per second that ``--concurrency`` back-to-back clients sustain."""
    done = 0
    deadline = time.monotonic() + seconds

    async def worker(index: int) -> None:
        nonlocal done
        n = 0
        while time.monotonic() < deadline:
            response = await client.post("/v1/chat/completions", json=_body(args, f"probe {index} {n}"))
            done += response.status_code == 200
            n += 1

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
    return done / (time.monotonic() - started)


async def unloaded_latencies(client, args: argparse.Namespace, seconds: float) -> list[float]:
    """Latencies of one client alone, back to back, after a warm-up request: the baseline of the p99."""
    await client.post("/v1/chat/completions", json=_body(args, "warm-up"))
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or len(latencies) < 5:
        sent = time.monotonic()
        response = await client.post("/v1/chat/completions", json=_body(args, f"alone {len(latencies)}"))
        if response.status_code == 200:
            latencies.append(time.monotonic() - sent)
    return sorted(latencies)


async def offer_load(client, args: argparse.Namespace, rate: float, seconds: float) -> list[dict[str, Any]]:
    """Open-loop Poisson arrivals: a slow server does not slow the offered load down."""
    rng = random.Random(args.seed)
    outcomes: list[dict[str, Any]] = []
    tasks = []
    start = time.monotonic()
    at = 0.0
    while len(tasks) < args.max_requests:
        at += rng.expovariate(rate)
        if at >= seconds:
            break
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        tasks.append(asyncio.create_task(_one(client, args, len(tasks), start, outcomes)))
    await asyncio.gather(*tasks)
    return outcomes


async def _one(client, args: argparse.Namespace, index: int, start: float, outcomes: list) -> None:
    import httpx

    sent = time.monotonic()
    record: dict[str, Any] = {"t": sent - start}
    try:
        response = await client.post("/v1/chat/completions", json=_body(args, f"load {index}"))
        record["latency_s"] = time.monotonic() - sent
        record["status"] = response.status_code
        record["outcome"] = _classify(response)
        record["retry_after"] = "retry-after" in response.headers
    except httpx.HTTPError as exc:
        record.update(outcome="lost", error=type(exc).__name__, latency_s=time.monotonic() - sent)
    outcomes.append(record)


def _classify(response) -> str:
    if response.status_code == 200:
        try:
            body = response.json()
            ok = body["choices"][0]["message"]["content"] is not None and body["usage"]["completion_tokens"] > 0
        except (ValueError, KeyError, IndexError, TypeError):
            ok = False
        return "succeeded" if ok else "unexpected"
    return "rejected" if response.status_code in (429, 503) else "unexpected"


def _body(args: argparse.Namespace, text: str) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
    }


async def sample_memory(pid: int, timeline: list[tuple[float, float]], every_s: float = 0.5) -> None:
    import psutil

    root = psutil.Process(pid)
    start = time.monotonic()
    while True:
        total = 0
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a process that ended between listing and reading
                total += process.memory_info().rss
        timeline.append((round(time.monotonic() - start, 2), round(total / 2**20, 1)))
        await asyncio.sleep(every_s)


def summarize(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    counts = {k: sum(o["outcome"] == k for o in outcomes) for k in ("succeeded", "rejected", "unexpected", "lost")}
    latencies = sorted(o["latency_s"] for o in outcomes if o["outcome"] == "succeeded")
    figures: dict[str, Any] = {"sent": len(outcomes), **counts}
    figures["rejected_with_retry_after"] = sum(o["outcome"] == "rejected" and o["retry_after"] for o in outcomes)
    figures["unexpected_statuses"] = sorted({o["status"] for o in outcomes if o["outcome"] == "unexpected"})
    for q in (50, 90, 99):
        figures[f"latency_s_p{q}"] = _percentile(latencies, q)
    figures["latency_timeline"] = _windows(outcomes)
    return figures


def _percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def _windows(outcomes: list[dict[str, Any]], width_s: float = 2.0) -> list[dict[str, Any]]:
    """Per window of send time: p50 latency of successes and counts by outcome."""
    if not outcomes:
        return []
    last = max(o["t"] for o in outcomes)
    rows = []
    for i in range(int(last // width_s) + 1):
        window = [o for o in outcomes if i * width_s <= o["t"] < (i + 1) * width_s]
        ok = [o["latency_s"] for o in window if o["outcome"] == "succeeded"]
        rows.append(
            {
                "t": i * width_s,
                "p50_s": statistics.median(ok) if ok else None,
                **{k: sum(o["outcome"] == k for o in window) for k in ("succeeded", "rejected", "unexpected", "lost")},
            }
        )
    return rows


def _plot(result: dict[str, Any], path: Path) -> None:
    from mmrag.benchmarks.common import pyplot

    plt = pyplot()

    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    rows = result["latency_timeline"]
    t = [r["t"] for r in rows]
    top.plot(t, [r["p50_s"] for r in rows], marker="o")
    top.set_ylabel("p50 latency of successes (s)")
    ratio = result.get("p99_vs_unloaded")
    top.set_title(
        f"{result['offered_rps']:.1f} req/s scheduled ({result['achieved_rps']:.1f} sent) vs "
        f"capacity {result['capacity_rps']:.1f} req/s"
        + (f"; p99 {ratio:.2f}x unloaded" if ratio else "")
        + ("; hostile mix on" if result.get("hostile") else "")
    )
    bottom_of = [0] * len(rows)
    for kind, colour in (
        ("succeeded", "tab:green"),
        ("rejected", "tab:orange"),
        ("unexpected", "tab:red"),
        ("lost", "black"),
    ):
        heights = [r[kind] for r in rows]
        middle.bar(t, heights, width=1.8, bottom=bottom_of, color=colour, label=kind, align="edge")
        bottom_of = [a + b for a, b in zip(bottom_of, heights, strict=True)]
    middle.set_ylabel("requests sent per 2 s")
    middle.legend(loc="upper right", fontsize="small")
    memory = result.get("memory_timeline") or []
    if memory:
        bottom.plot([m[0] for m in memory], [m[1] for m in memory])
    bottom.set_ylabel("server RSS (MiB)")
    bottom.set_xlabel("seconds since the load started")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
