"""``mmrag bench batch``: offline batch throughput on the tiny model, against two baselines in the same run.

The same generated chat requests (text only, greedy, ``max_tokens`` fixed) are answered three ways,
each in its own process so engines never compete for the CPU:

- ``mmrag_batch``: the ``mmrag batch`` chain in-process (validation, chain, vLLM ``AsyncLLM`` with
  ``concurrency`` requests in flight, output lines written and flushed);
- ``vllm_llm_chat``: vLLM's offline ``LLM.chat`` on the same messages and chat template, the ceiling;
- ``server_one_by_one``: ``mmrag serve`` on loopback, the same requests sent one after another.

Each timing starts once its engine is up and warmed (a few requests) and covers only the answering.
The phases run in ``--rounds`` rounds, each round visiting the three in an order shuffled with ``--seed``
(a fixed order would hand its drift in machine load and caches to one phase); a phase's figure is the
median over its rounds, with the range (``seconds_spread``).
Figures: requests/s and completion tokens/s of each, and the ratios ``batch_over_llm_chat`` (target
>= 0.85) and ``batch_over_server`` (target >= 3). Greedy decoding makes the batch and ``LLM.chat``
produce the same tokens, checked as ``outputs_match``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

HELP = "Batch throughput (tiny model): mmrag batch vs vLLM LLM.chat vs one-by-one requests to mmrag serve."

MODEL = "mmrag-tiny-llava"
# Small engine settings shared by every phase (the tiny model needs little KV cache).
CONFIG = {
    "model": {"name": "tiny-random"},
    "engine": {"max_model_len": 1024, "kv_cache_space_gib": 2},
    "retrieval": {"ingest_demo_corpus": False, "default_mode": "none"},
}
_TOPICS = "a lighthouse|a tram line|salt mining|a violin|river tides|a snow gauge|a chess club|plum harvests"


@dataclass(frozen=True)
class Settings:
    requests: int = 500
    server_requests: int = 500  # sent one by one: the slow baseline
    max_tokens: int = 16
    concurrency: int | None = None  # None: mmrag batch's default
    warmup: int = 4
    rounds: int = 3
    seed: int = 0
    server_start_timeout_s: float = 600.0


FULL = Settings()
QUICK = replace(FULL, requests=256, server_requests=32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=None, help="Batch and LLM.chat requests (500; quick 256).")
    parser.add_argument("--server-requests", type=int, default=None, help="One-by-one requests (500; quick 32).")
    parser.add_argument(
        "--concurrency", type=int, default=None, help="mmrag batch in-flight requests (default: mmrag batch's)."
    )
    parser.add_argument("--rounds", type=int, default=None, help="Rounds over the three phases (3).")
    parser.add_argument("--seed", type=int, default=None, help="Shuffles the phase order of each round (0).")


def make_bodies(n: int, max_tokens: int) -> list[dict[str, Any]]:
    topics = _TOPICS.split("|")
    return [
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Request {i}: write a short note about {topics[i % 8]}."}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        for i in range(n)
    ]


def run(args: argparse.Namespace) -> int:
    from mmrag.benchmarks.common import plot_path, shuffled_rounds, write_result

    settings = QUICK if args.quick else FULL
    overrides = {
        "requests": args.requests,
        "server_requests": args.server_requests,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "seed": args.seed,
    }
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    if settings.concurrency is None:
        from mmrag.serving.batch.job import BatchOptions

        settings = replace(settings, concurrency=BatchOptions().concurrency)
    workdir = Path(tempfile.mkdtemp(prefix="mmrag-bench-batch-"))
    bodies = make_bodies(settings.requests, settings.max_tokens)
    (workdir / "bodies.json").write_text(json.dumps(bodies))
    (workdir / "config.json").write_text(json.dumps(CONFIG))

    orders = shuffled_rounds(list(PHASES), settings.rounds, settings.seed)
    samples: dict[str, list[dict[str, Any]]] = {phase: [] for phase in PHASES}
    for index, order in enumerate(orders):
        for phase in order:
            print(f"round {index + 1}/{settings.rounds}: phase {phase} ...", flush=True)
            samples[phase].append(run_phase(phase, workdir, settings))
            print(f"phase {phase}: {samples[phase][-1]['seconds']:.2f} s", flush=True)
    figures = summarise({phase: merge_rounds(runs) for phase, runs in samples.items()})
    figures["orders"] = orders
    path = write_result("batch", figures, {**asdict(settings), "engine": CONFIG["engine"]}, args.out)
    _plot(plot_path(path), figures)
    print(json.dumps({k: v for k, v in figures.items() if k != "phases"}, indent=2))
    print(f"wrote {path}")
    return 0


def merge_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One phase's rounds as one: the median time with its range; the first round's answers and counts."""
    from mmrag.benchmarks.common import spread

    seconds = [run["seconds"] for run in runs]
    summary = spread(seconds)
    return {**runs[0], "seconds": summary["median"], "seconds_spread": summary, "seconds_samples": seconds}


def summarise(phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rates = {name: p["requests"] / p["seconds"] for name, p in phases.items()}  # seconds: the median round
    batch_texts, chat_texts = phases["mmrag_batch"].pop("texts"), phases["vllm_llm_chat"].pop("texts")
    return {
        "requests_per_s": rates,
        "completion_tokens_per_s": {name: p["completion_tokens"] / p["seconds"] for name, p in phases.items()},
        "batch_over_llm_chat": rates["mmrag_batch"] / rates["vllm_llm_chat"],
        "batch_over_server": rates["mmrag_batch"] / rates["server_one_by_one"],
        "outputs_match": batch_texts == chat_texts,
        "phases": phases,
    }


def run_phase(phase: str, workdir: Path, settings: Settings) -> dict[str, Any]:
    """One phase in a fresh process (vLLM's engine processes need a ``__main__`` guard, and isolation)."""
    result = workdir / f"{phase}.json"
    command = [sys.executable, "-m", "mmrag.benchmarks.batch", phase, str(workdir), json.dumps(asdict(settings))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    subprocess.run(command, check=True, env=env)
    return json.loads(result.read_text())


# ---- phases (each runs in its own process) ----


def phase_mmrag_batch(workdir: Path, settings: Settings) -> dict[str, Any]:
    import asyncio

    from mmrag.serving.batch.chain import BatchChain
    from mmrag.serving.batch.job import BatchOptions
    from mmrag.serving.batch.local import answer_all, start_engine
    from mmrag.serving.batch.output import OutputWriter
    from mmrag.serving.batch.records import BatchLine
    from mmrag.serving.batch.summary import BatchSummary
    from mmrag.serving.config import MmragConfig
    from mmrag.serving.pipeline import LocalBackend

    config = MmragConfig.model_validate(CONFIG)
    concurrency = settings.concurrency or BatchOptions().concurrency  # set by run(); None when run alone
    bodies = json.loads((workdir / "bodies.json").read_text())
    lines = [BatchLine(i + 1, f"r{i}", body) for i, body in enumerate(bodies)]
    records: dict[str, dict[str, Any]] = {}
    summary = BatchSummary()

    async def measure() -> float:
        engine = await start_engine(config, None)
        chain = BatchChain(config, LocalBackend(engine))
        await answer_all(lines[: settings.warmup], chain.answer, lambda _: None, settings.warmup)
        with OutputWriter(workdir / "batch-output.jsonl") as writer:

            def record(answer: dict[str, Any]) -> None:
                writer.write(answer)
                summary.add(answer)
                records[answer["custom_id"]] = answer

            started = time.perf_counter()
            await answer_all(lines, chain.answer, record, concurrency)
            elapsed = time.perf_counter() - started
        await engine.shutdown()
        return elapsed

    seconds = asyncio.run(measure())
    if summary.failed:
        raise RuntimeError(f"{summary.failed} batch requests failed; see {workdir / 'batch-output.jsonl'}")
    texts = [records[f"r{i}"]["response"]["body"]["choices"][0]["message"]["content"] for i in range(len(lines))]
    return {
        "requests": len(lines),
        "seconds": seconds,
        "completion_tokens": summary.completion_tokens,
        "texts": texts,
    }


def phase_vllm_llm_chat(workdir: Path, settings: Settings) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from mmrag.serving.config import MmragConfig
    from mmrag.serving.engine.prompt import load_chat_template
    from mmrag.serving.models.registry import model_path

    config = MmragConfig.model_validate(CONFIG)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.engine.kv_cache_space_gib))
    checkpoint = model_path(config.model)
    llm = LLM(
        model=checkpoint,
        max_model_len=config.engine.max_model_len,
        dtype=config.engine.dtype,
        enforce_eager=config.engine.enforce_eager,
        seed=config.engine.seed,
        limit_mm_per_prompt={"image": config.limits.max_images_per_request},
    )
    template = load_chat_template(checkpoint)  # the template mmrag's engine renders with
    conversations = [body["messages"] for body in json.loads((workdir / "bodies.json").read_text())]
    params = SamplingParams(temperature=0, max_tokens=settings.max_tokens)
    llm.chat(conversations[: settings.warmup], params, chat_template=template, use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.chat(conversations, params, chat_template=template, use_tqdm=False)
    seconds = time.perf_counter() - started
    return {
        "requests": len(outputs),
        "seconds": seconds,
        "completion_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        "texts": [o.outputs[0].text for o in outputs],
    }


def phase_server_one_by_one(workdir: Path, settings: Settings) -> dict[str, Any]:
    import httpx

    from mmrag.serving.paths import cache_dir
    from mmrag.serving.server_process import running_server

    bodies = json.loads((workdir / "bodies.json").read_text())[: settings.server_requests]
    config_path = workdir / "config.json"  # JSON is YAML
    with (
        running_server(
            config_path,
            cache_dir=cache_dir(),
            log_path=workdir / "serve.log",
            start_timeout_s=settings.server_start_timeout_s,
        ) as server,
        httpx.Client(base_url=server.url, timeout=120) as client,
    ):
        for body in bodies[: settings.warmup]:
            client.post("/v1/chat/completions", json=body).raise_for_status()
        completion_tokens = 0
        started = time.perf_counter()
        for body in bodies:
            response = client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            completion_tokens += response.json()["usage"]["completion_tokens"]
        seconds = time.perf_counter() - started
    return {
        "requests": len(bodies),
        "seconds": seconds,
        "completion_tokens": completion_tokens,
    }


def _plot(path: Path, figures: dict[str, Any]) -> None:
    from mmrag.benchmarks.common import pyplot

    plt = pyplot()
    rates = figures["requests_per_s"]
    phases = figures["phases"]
    # The range over rounds: the slowest and fastest round's rate around the median's.
    below = [rates[n] - phases[n]["requests"] / phases[n]["seconds_spread"]["max"] for n in rates]
    above = [phases[n]["requests"] / phases[n]["seconds_spread"]["min"] - rates[n] for n in rates]
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = ["tab:blue", "tab:gray", "tab:orange"]
    bars = ax.bar(list(rates), list(rates.values()), yerr=[below, above], capsize=4, color=colours)
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel(f"requests / s (median of {len(figures['orders'])} rounds, range)")
    ax.set_title(
        f"batch / LLM.chat = {figures['batch_over_llm_chat']:.2f}x (target 0.85), "
        f"batch / server = {figures['batch_over_server']:.1f}x (target 3)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PHASES = {
    "mmrag_batch": phase_mmrag_batch,
    "vllm_llm_chat": phase_vllm_llm_chat,
    "server_one_by_one": phase_server_one_by_one,
}

if __name__ == "__main__":  # a phase process: NAME WORKDIR SETTINGS_JSON
    name, folder, raw_settings = sys.argv[1:4]
    measured = PHASES[name](Path(folder), Settings(**json.loads(raw_settings)))
    (Path(folder) / f"{name}.json").write_text(json.dumps(measured))
