"""Helpers for batch tests: input lines in the OpenAI Batch format and reading output files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = "mmrag-tiny-llava"
FAKE_ENGINE = "tests.fake_engine:FakeEngine"
# The fake engines never load a model (tiny-random keeps the CLI from preparing the default one, and its name
# is the lines' `model`), and a line retrieves only when it asks (the default server retrieves for every one).
PLAIN_SETTINGS = ("--set", "model.name=tiny-random", "--set", "retrieval.default_mode=none")


def batch_config(settings: dict[str, Any] | None = None):
    """A config for the fake engines: the tiny-random model's name (the lines' ``model``; no default model
    prepared) and retrieval only where a line asks (the default server retrieves for every request)."""
    from mmrag.serving.config import MmragConfig

    settings = settings or {}
    retrieval = {"default_mode": "none", **settings.get("retrieval", {})}
    return MmragConfig.model_validate({**settings, "model": {"name": "tiny-random"}, "retrieval": retrieval})


def chat_line(custom_id: str, text: str, **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": text}]
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": messages, **body},
    }


def write_jsonl(path: Path, lines: list[dict[str, Any] | str]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_custom_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    ids = [r["custom_id"] for r in records]
    assert len(ids) == len(set(ids)), f"duplicated custom_ids in the output: {ids}"
    return {r["custom_id"]: r for r in records}


def batch_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmrag.serving.cli", "batch", *args, "--no-progress", *PLAIN_SETTINGS]


def batch_env(**extra: str) -> dict[str, str]:
    """The CLI's environment: the repository on the path, so ``tests.fake_engine`` imports."""
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **extra}


def kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture
def fake_config():
    return batch_config({"limits": {"max_n": 3}})
