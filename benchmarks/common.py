"""What every benchmark shares: the machine description and one way to write results.

A result file holds ``figures`` (the measurements, ratios against a baseline measured in the same run),
``config`` (what was run) and ``machine`` (where); a plot with the same stem sits beside it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


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


def plot_path(json_path: Path) -> Path:
    return json_path.with_suffix(".png")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
