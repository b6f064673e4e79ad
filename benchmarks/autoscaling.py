"""``mmrag bench autoscaling``: the LLM deployment scaling up under load and back down after it, on a local Serve.

The real application (ingress, ``LLMServer``, retriever) runs on an in-process Ray with the test engine
(``tests.fake_engine:FakeEngine``): a request ``"sleep 0.5"`` holds an LLM slot for half a second and needs
no model, so the figures are Serve's behaviour, not an engine's. The LLM stage autoscales with short
delays (``target_ongoing_requests`` 1, ``max_ongoing_requests`` 2: a replica serves two requests and the
rest wait in the caller's queue, so more replicas also mean shorter waits).

``clients`` threads send requests back to back over loopback for ``load_s`` seconds (longer, up to
``load_max_s``, while no replica above the minimum is running yet; never more than ``max_requests``), then
stop; the LLM's replicas are sampled from ``serve.status()`` every ``sample_s`` throughout, and after the
load until the deployment is back at ``min_replicas`` with nothing left stopping (at most ``settle_max_s``).

Figures: the timeline (``t`` from the start of sampling; running and wanted replicas, requests in flight,
median latency of the requests finished in the last ``latency_window_s``), the most replicas running,
the times from the start of the load to the first extra replica wanted / running and to all
``max_replicas`` running, the time from the end of the load back to the minimum, and the median latency
of requests started while the minimum vs the maximum of replicas ran.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx

HELP = "LLM autoscaling on a local Ray Serve (fake engine): replicas and latency under a bounded load."

REPO = Path(__file__).resolve().parents[1]
ENGINE = "tests.fake_engine:FakeEngine"
APP_NAME = "autoscaling-bench"
LLM_DEPLOYMENT = "LLMServer"
# Replica states that count towards what the deployment wants (STOPPING ones are on their way out).
_WANTED_STATES = ("STARTING", "UPDATING", "RECOVERING", "RUNNING", "PENDING_MIGRATION")


@dataclass(frozen=True)
class Settings:
    min_replicas: int = 1
    max_replicas: int = 3
    target_ongoing_requests: float = 1.0
    upscale_delay_s: float = 1.0
    downscale_delay_s: float = 4.0
    metrics_interval_s: float = 0.5
    look_back_period_s: float = 2.0
    max_ongoing_requests: int = 2
    clients: int = 6
    request_s: float = 0.5
    load_s: float = 30.0
    load_max_s: float = 60.0
    max_requests: int = 5000
    settle_max_s: float = 60.0
    baseline_s: float = 2.0
    sample_s: float = 0.5
    latency_window_s: float = 2.0
    request_timeout_s: float = 60.0
    ray_num_cpus: int = 4


FULL = Settings()
QUICK = replace(FULL, load_s=12.0, load_max_s=30.0, max_requests=1500, settle_max_s=25.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=None, help="Concurrent client threads (default 6).")
    parser.add_argument("--load-s", type=float, default=None, help="Seconds of load (default 30; quick 12).")
    parser.add_argument("--max-replicas", type=int, default=None, help="LLM max_replicas (default 3).")


def app_config(settings: Settings, workdir: Path) -> dict[str, Any]:
    """The mmrag config of the run: LLM autoscaling with short delays, a light retriever."""
    return {
        "deployments": {
            "llm": {
                "max_ongoing_requests": settings.max_ongoing_requests,
                "autoscaling": {
                    "min_replicas": settings.min_replicas,
                    "max_replicas": settings.max_replicas,
                    "target_ongoing_requests": settings.target_ongoing_requests,
                    "upscale_delay_s": settings.upscale_delay_s,
                    "downscale_delay_s": settings.downscale_delay_s,
                    "metrics_interval_s": settings.metrics_interval_s,
                    "look_back_period_s": settings.look_back_period_s,
                },
            }
        },
        # The fake engine answers as the tiny-random model's name; requests retrieve nothing.
        "model": {"name": "tiny-random"},
        "retrieval": {"ingest_demo_corpus": False, "uri": str(workdir / "milvus.db"), "default_mode": "none"},
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(settings: Settings, workdir: Path) -> str:
    """Start Ray, Serve and the app on loopback; return its base URL. Pair with :func:`stop_app`."""
    import ray
    from ray import serve

    from mmrag.deployments.app import build_application
    from mmrag.serving.config import MmragConfig

    if not (REPO / "tests" / "fake_engine.py").is_file():
        raise RuntimeError(f"{ENGINE} not found under {REPO}: run from a source checkout")
    config = MmragConfig.model_validate(app_config(settings, workdir))
    port = _free_port()
    ray.init(
        num_cpus=settings.ray_num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    with warnings.catch_warnings():
        # Serve marks metrics_interval_s deprecated (for env variables that 2.x does not read yet).
        warnings.simplefilter("ignore", DeprecationWarning)
        serve.run(build_application(config, engine_cls=ENGINE), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def stop_app() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def llm_replicas() -> dict[str, int]:
    """The LLM deployment's replica count per state, e.g. ``{"RUNNING": 2, "STARTING": 1}``."""
    from ray import serve

    deployment = serve.status().applications[APP_NAME].deployments[LLM_DEPLOYMENT]
    return {str(getattr(state, "value", state)): n for state, n in deployment.replica_states.items() if n}


class Load:
    """``clients`` threads, each sending one ``sleep`` request after another until stopped."""

    def __init__(self, url: str, settings: Settings, clock_zero: float) -> None:
        self.url = url
        self.settings = settings
        self.zero = clock_zero
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        self.in_flight = 0
        self.records: list[tuple[float, float, int]] = []  # (start t, end t, HTTP status or -1)
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(settings.clients)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=self.settings.request_timeout_s + 5)

    def _client(self) -> None:
        body = {
            "model": "mmrag-tiny-llava",
            "messages": [{"role": "user", "content": f"sleep {self.settings.request_s}"}],
        }
        with httpx.Client(timeout=self.settings.request_timeout_s, trust_env=False) as client:
            while not self.stop_event.is_set():
                with self.lock:
                    if self.sent >= self.settings.max_requests:
                        return
                    self.sent += 1
                    self.in_flight += 1
                start = time.monotonic() - self.zero
                try:
                    status = client.post(f"{self.url}/v1/chat/completions", json=body).status_code
                except httpx.HTTPError:
                    status = -1
                end = time.monotonic() - self.zero
                with self.lock:
                    self.in_flight -= 1
                    self.records.append((start, end, status))


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def measure(settings: Settings, workdir: Path, log: bool = True) -> dict[str, Any]:
    """Start the app, run the load, sample until back at the minimum, stop everything; return the figures."""
    say = print if log else (lambda *_: None)
    started = time.monotonic()
    url = start_app(settings, workdir)
    say(f"app up in {time.monotonic() - started:.1f} s at {url}", flush=True)
    try:
        return _run(url, settings, say)
    finally:
        stop_app()


def _run(url: str, settings: Settings, say: Any) -> dict[str, Any]:
    zero = time.monotonic()
    load = Load(url, settings, zero)
    samples: list[dict[str, Any]] = []
    load_start = load_stop = None
    up_wanted_t = up_running_t = at_max_t = down_t = None
    minimum = settings.min_replicas
    next_sample = 0.0
    while True:
        t = time.monotonic() - zero
        if load_start is None and t >= settings.baseline_s:
            load_start = t
            load.start()
            say(f"t={t:5.1f} s load started: {settings.clients} clients x 'sleep {settings.request_s}'", flush=True)
        states = llm_replicas()
        running = states.get("RUNNING", 0)
        wanted = sum(states.get(s, 0) for s in _WANTED_STATES)
        with load.lock:
            in_flight = load.in_flight
        samples.append(
            {"t": round(t, 3), "running": running, "wanted": wanted, "in_flight": in_flight, "states": states}
        )
        if load_start is not None and load_stop is None:
            since = t - load_start
            if up_wanted_t is None and wanted > minimum:
                up_wanted_t = since
            if up_running_t is None and running > minimum:
                up_running_t = since
                say(f"t={t:5.1f} s {running} replicas running", flush=True)
            if at_max_t is None and running >= settings.max_replicas:
                at_max_t = since
            done = since >= settings.load_s and (up_running_t is not None or since >= settings.load_max_s)
            if done or load.sent >= settings.max_requests:
                load.stop()
                load_stop = time.monotonic() - zero
                say(f"t={load_stop:5.1f} s load stopped after {load.sent} requests", flush=True)
        elif load_stop is not None:
            if down_t is None and wanted == minimum and running == minimum:
                down_t = t - load_stop
                say(f"t={t:5.1f} s back to {minimum} replica(s)", flush=True)
            if down_t is not None and sum(states.values()) == minimum:
                break  # nothing left stopping either
            if t - load_stop >= settings.settle_max_s:
                say(f"t={t:5.1f} s gave up waiting for the minimum: {states}", flush=True)
                break
        next_sample += settings.sample_s
        time.sleep(max(0.0, next_sample - (time.monotonic() - zero)))

    records = sorted(load.records, key=lambda r: r[1])
    ok = [r for r in records if r[2] == 200]
    for sample in samples:
        low = sample["t"] - settings.latency_window_s
        window = [end - start for start, end, _ in ok if low < end <= sample["t"]]
        sample["p50_latency_s"] = _median(window)
        sample["completed"] = len(window)

    def running_at(t: float) -> int:
        before = [s["running"] for s in samples if s["t"] <= t]
        return before[-1] if before else minimum

    max_running = max(s["running"] for s in samples)
    at_min = [end - start for start, end, _ in ok if running_at(start) == minimum]
    at_top = [end - start for start, end, _ in ok if running_at(start) == max_running > minimum]
    return {
        "timeline": samples,
        "load_start_s": load_start,
        "load_stop_s": load_stop,
        "min_replicas": minimum,
        "max_replicas_reached": max_running,
        "scaled_up": max_running > minimum,
        "time_to_upscale_decision_s": up_wanted_t,
        "time_to_scale_up_s": up_running_t,
        "time_to_max_replicas_s": at_max_t,
        "scaled_down": down_t is not None,
        "time_to_scale_down_s": down_t,
        "final_replicas": samples[-1]["states"],
        "requests": {
            "sent": load.sent,
            "ok": len(ok),
            "errors": len(records) - len(ok),
            "unfinished": load.sent - len(records),
            "per_s": len(ok) / (load_stop - load_start) if load_stop and load_start is not None else None,
        },
        "p50_latency_s": _median([end - start for start, end, _ in ok]),
        "p50_latency_at_min_replicas_s": _median(at_min),
        "p50_latency_at_max_replicas_s": _median(at_top),
    }


def run(args: argparse.Namespace) -> int:
    from mmrag.benchmarks.common import write_result

    settings = QUICK if args.quick else FULL
    overrides = {"clients": args.clients, "load_s": args.load_s, "max_replicas": args.max_replicas}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    if settings.load_max_s < settings.load_s:
        settings = replace(settings, load_max_s=settings.load_s)
    with tempfile.TemporaryDirectory(prefix="mmrag-autoscaling-") as tmp:
        figures = measure(settings, Path(tmp))
    config = {
        **asdict(settings),
        "engine": ENGINE,
        "request": f"non-streaming chat completion 'sleep {settings.request_s}' over loopback HTTP",
        "replicas_source": "serve.status() replica_states of LLMServer (running: RUNNING; wanted: not STOPPING)",
    }
    path = write_result("autoscaling", figures, config, args.out)
    _plot(path, figures, settings)
    print(
        f"max replicas {figures['max_replicas_reached']}, up after {figures['time_to_scale_up_s']} s, "
        f"down after {figures['time_to_scale_down_s']} s; p50 latency at min "
        f"{figures['p50_latency_at_min_replicas_s']} s, at max {figures['p50_latency_at_max_replicas_s']} s"
    )
    print(f"wrote {path}")
    return 0 if figures["scaled_up"] and figures["scaled_down"] else 1


def _plot(path: Path, figures: dict[str, Any], settings: Settings) -> None:
    from matplotlib.ticker import MaxNLocator

    from mmrag.benchmarks.common import pyplot

    plt = pyplot()
    from mmrag.benchmarks.common import plot_path

    timeline = figures["timeline"]
    t = [s["t"] for s in timeline]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for ax in (top, bottom):
        if figures["load_start_s"] is not None and figures["load_stop_s"] is not None:
            ax.axvspan(figures["load_start_s"], figures["load_stop_s"], color="tab:orange", alpha=0.12, lw=0)
    top.step(t, [s["running"] for s in timeline], where="post", label="running", color="tab:blue")
    top.step(
        t,
        [s["wanted"] for s in timeline],
        where="post",
        label="wanted (not stopping)",
        color="tab:blue",
        ls="--",
        alpha=0.6,
    )
    top.axhline(settings.min_replicas, color="grey", lw=0.8, ls=":")
    top.axhline(settings.max_replicas, color="grey", lw=0.8, ls=":")
    top.set_ylabel("LLM replicas")
    top.set_ylim(-0.2, settings.max_replicas + 0.8)
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.legend(loc="center right")
    top.set_title(
        f"LLM autoscaling: {settings.clients} clients x {settings.request_s} s requests (shaded: load), "
        f"target {settings.target_ongoing_requests:g}/replica",
        fontsize=9,
    )
    p50 = [s["p50_latency_s"] if s["p50_latency_s"] is not None else float("nan") for s in timeline]
    bottom.plot(t, p50, color="tab:red", label=f"p50 latency ({settings.latency_window_s:g} s window)")
    bottom.set_ylabel("latency (s)")
    bottom.set_xlabel("time (s)")
    bottom.set_ylim(bottom=0)
    flight = bottom.twinx()
    flight.step(t, [s["in_flight"] for s in timeline], where="post", color="tab:green", alpha=0.6, label="in flight")
    flight.set_ylabel("requests in flight")
    flight.set_ylim(0, settings.clients + 1)
    lines = bottom.get_legend_handles_labels()
    more = flight.get_legend_handles_labels()
    bottom.legend(lines[0] + more[0], lines[1] + more[1], loc="center right")
    fig.tight_layout()
    fig.savefig(plot_path(path), dpi=120)
    plt.close(fig)
