"""One real server for the whole end-to-end session: `mmrag serve` (Ray Serve + vLLM + tiny LLaVA)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from mmrag.serving.server_process import running_server

CONFIG = Path(__file__).with_name("config.yaml")


@pytest.fixture(scope="session")
def server_url(tmp_path_factory) -> str:
    logs = tmp_path_factory.mktemp("server")
    with running_server(CONFIG, cache_dir=tmp_path_factory.mktemp("cache"), log_path=logs / "serve.log") as server:
        yield server.url


@pytest.fixture(scope="session")
def client(server_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=120)
