"""Real servers shared by the end-to-end tests of this package (stopped when its last test is done): `mmrag serve`
(Ray Serve + vLLM) on the tiny random LLaVA with the test configuration (plumbing), and, started on first use, the
default server as a user gets it."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from mmrag.serving.server_process import RunningServer, running_server

CONFIG = Path(__file__).with_name("config.yaml")


@pytest.fixture(scope="package")
def tiny_server(tmp_path_factory) -> RunningServer:
    logs = tmp_path_factory.mktemp("server")
    with running_server(CONFIG, cache_dir=tmp_path_factory.mktemp("cache"), log_path=logs / "serve.log") as server:
        yield server


@pytest.fixture(scope="package")
def server_url(tiny_server) -> str:
    return tiny_server.url


@pytest.fixture(scope="package")
def client(server_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="package")
def default_client(tmp_path_factory) -> openai.OpenAI:
    """``mmrag serve`` with no configuration at all: smol, text retrieval over the demo corpus, vector stores."""
    work = tmp_path_factory.mktemp("default")
    with running_server(cache_dir=work / "cache", log_path=work / "serve.log") as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The trained model's tests (their own server) run first among these, before the package's shared servers
    start, and those stop when the package is done (scope "package"): with three vLLM engines alive at once
    beside the tests' own processes, CI's 24 GiB machine ran out of memory and Ray killed replicas."""
    trained = [item for item in items if item.path.name == "test_trained_model_e2e.py"]
    here = Path(__file__).parent
    first = next((i for i, item in enumerate(items) if item.path.parent == here), None)
    if not trained or first is None:
        return
    moved = set(map(id, trained))
    rest = [item for item in items if id(item) not in moved]
    items[:] = rest[:first] + trained + rest[first:]
