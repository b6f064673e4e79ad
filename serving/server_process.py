"""``mmrag serve`` in a child process, for end-to-end tests and benchmarks that need a real server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    pid: int  # of `mmrag serve`; Ray and vLLM processes are its descendants


@contextlib.contextmanager
def running_server(
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    cache_dir: str | Path | None = None,
    log_path: str | Path | None = None,
    start_timeout_s: float = 600,
) -> Iterator[RunningServer]:
    """Start ``mmrag serve`` on a free loopback port, yield it once ``/health`` is 200, and
    stop it with SIGINT (the Ctrl-C path users take) on exit. The server's output goes to ``log_path``.

    The server gets a process group of its own (a terminal's Ctrl-C does not reach it; the group can be
    killed) but stays in the caller's session: Linux's CFS autogroup schedules each session as one group, and
    a server in a session of its own starved a benchmark client's event loop by 100-300 ms at a time on a busy
    2-core machine (``mmrag bench serving`` measured it), so the client, not the server, set the latencies."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="mmrag-server-"))
    log_path = Path(log_path or workdir / "serve.log")
    env = {**os.environ, "MMRAG_CACHE_DIR": str(cache_dir or workdir / "cache")}
    command = [sys.executable, "-m", "mmrag.serving.cli", "serve", "--port", str(port), "--host", "127.0.0.1"]
    if config is not None:
        command += ["--config", str(config)]
    for item in overrides or []:
        command += ["--set", item]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, process_group=0)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, log_path, start_timeout_s)
        yield RunningServer(url=url, pid=process.pid)
    finally:
        stop_process(process)


def _wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mmrag serve exited with {process.returncode}:\n{log_path.read_text()[-5000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"server not healthy after {timeout_s}s:\n{log_path.read_text()[-5000:]}")


def stop_process(process: subprocess.Popen) -> None:
    """SIGINT (the Ctrl-C path, a clean shutdown), then SIGKILL to the group after 60 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
