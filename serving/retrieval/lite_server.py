"""Milvus Lite as a local server process, so every process of a machine shares the embedded default.

A Milvus Lite path (``retrieval.uri`` unset, or ending in ``.db``) is a *directory* that one process at a
time may open (milvus-lite 3 holds ``<dir>/LOCK``). ``pymilvus.MilvusClient(uri="x.db")`` opens it inside
the calling process: ``milvus_lite.server_manager`` starts a gRPC server on a thread with ``x.db`` as its
data directory. ``milvus-lite server --data-dir x.db`` runs the same server on the same directory in a
process of its own, which any number of clients share: the two modes read and write the same files, so an
existing ``.db`` needs no migration and either mode can open it (one at a time).

:class:`LiteServer` starts and stops that process for ``mmrag serve`` (loopback only, a free port, SIGINT
then SIGKILL after a grace). Other processes (``mmrag ingest``, ``mmrag collections``, batch jobs) find it
through a state file beside the data directory, ``<dir>.server.json`` = ``{"uri", "pid", "owner_pid",
"data_dir"}``, written atomically by the process that started it and read by :func:`find_running`, which
believes it only while the server's process lives and its port accepts connections. A state file and not a
fixed port: each data directory (the cache dir of each user, each test's tmp dir) gets its own server
without configuration, a fixed port could be taken by anything (19530 by a real Milvus), and the file sits
where every mmrag command already looks, the path of the Lite data in its config.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmrag.serving.retrieval.config import RetrievalConfig

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"  # milvus-lite's own default is 0.0.0.0: always pass the host
START_TIMEOUT_S = 60.0
RELOAD_TIMEOUT_S = 60.0  # per collection loaded again after a restart
STOP_GRACE_S = 30.0  # milvus-lite drains requests (5 s), then closes: waits for its background index builds
_READY = "gRPC server listening on"  # what `milvus-lite server` prints once it serves


class LiteServerError(RuntimeError):
    """The server did not start (the data directory is held by another process, a bad path, a port)."""


def state_path(data_dir: Path) -> Path:
    return data_dir.with_name(data_dir.name + ".server.json")


def log_path(data_dir: Path) -> Path:
    return data_dir.with_name(data_dir.name + ".server.log")


@dataclass(frozen=True)
class ServerState:
    uri: str
    pid: int  # the milvus-lite server
    owner_pid: int  # the process that started it and stops it (mmrag serve)
    data_dir: str


def read_state(data_dir: Path) -> ServerState | None:
    try:
        raw = json.loads(state_path(data_dir).read_text())
        return ServerState(str(raw["uri"]), int(raw["pid"]), int(raw["owner_pid"]), str(raw["data_dir"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_running(data_dir: Path) -> ServerState | None:
    """The live Lite server recorded for ``data_dir``, or None (no state file, another directory's, its
    process gone, or its port closed: a stale file from a server that was killed)."""
    state = read_state(data_dir)
    if state is None or Path(state.data_dir) != data_dir.resolve():
        return None
    if not pid_alive(state.pid) or not port_open(state.uri):
        return None
    return state


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def port_open(uri: str, timeout_s: float = 1.0) -> bool:
    host, port = _host_port(uri)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


async def answers(uri: str, timeout_s: float = 1.0) -> bool:
    """Whether the server at ``uri`` accepts a connection within ``timeout_s`` (:func:`port_open` for an event
    loop: ``/health`` asks it on the ingress's)."""
    host, port = _host_port(uri)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def check_lite_server(retrieval: RetrievalConfig) -> None:
    """Raise a 503 naming retrieval while the Milvus Lite server the replicas share (``retrieval.lite_server_uri``)
    is down: `mmrag serve` restarts it on the same port within seconds, and meanwhile every search and vector
    store call fails, so ``/health`` says so (a load balancer stops sending traffic) rather than "ok". A
    Milvus server (``retrieval.uri``) is not checked: it is not ours to restart."""
    uri = retrieval.lite_server_uri
    if uri is None or not retrieval.is_lite() or await answers(uri):
        return
    from mmrag.serving.errors import ServiceUnavailableError

    raise ServiceUnavailableError(f"retrieval: the Milvus Lite server ({uri}) is not answering (down or restarting)")


def free_port(host: str = HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _host_port(uri: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    return parts.hostname or HOST, parts.port or 19530


class LiteServer:
    """One ``milvus-lite server`` child process on ``data_dir``, listening on loopback.

    ``start`` returns once the server says it listens (about 1.4 s) and records it in the state file;
    ``stop`` sends SIGINT (milvus-lite drains and closes the data directory, about 0.5 s) and SIGKILL after
    ``grace_s``; ``ensure_running`` restarts a server that died, on the same port (clients keep their URI).
    """

    def __init__(self, data_dir: Path, *, port: int | None = None, log_file: Path | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self.log_file = log_file or log_path(self.data_dir)
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._log_offset = 0

    @property
    def uri(self) -> str:
        if self.port is None:
            raise LiteServerError("the Milvus Lite server has not started")
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        if self.data_dir.is_file():
            raise LiteServerError(
                f"{self.data_dir} is a file, not a Milvus Lite 3 data directory (an older milvus-lite's format, "
                "which milvus-lite 3 opens in no mode): re-ingest the documents into a new path"
            )
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        chosen = self.port is not None
        for _attempt in range(1 if chosen else 3):  # a free port can be taken between our probe and its bind
            port = self.port if chosen else free_port()
            try:
                self._spawn(port, timeout_s)
                break
            except _PortTaken:
                continue
        else:
            taken = f"port {self.port} is in use" if chosen else "no free port found in 3 tries"
            raise LiteServerError(f"the Milvus Lite server did not start: {taken} (see {self.log_file})")
        self.port = port
        self._write_state()
        logger.info("Milvus Lite server started uri=%s pid=%s data_dir=%s", self.uri, self.pid, self.data_dir)

    def _spawn(self, port: int, timeout_s: float) -> None:
        # `milvus-lite server` of this interpreter's install (no PATH lookup), through the shim below.
        command = [
            sys.executable,
            "-c",
            _SHIM,
            str(os.getpid()),
            _SERIALIZED,
            "server",
            "--data-dir",
            str(self.data_dir),
        ]
        command += ["--host", HOST, "--port", str(port)]
        with open(self.log_file, "ab") as log:
            self._log_offset = log.tell()
            # Its own session: a Ctrl-C in the terminal reaches `mmrag serve` only, which stops this server
            # after Serve (whose replicas still use it while they drain).
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},  # its "listening" line is the ready signal
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                output = self.log_tail()
                if "Failed to bind" in output or "already in use" in output:
                    raise _PortTaken(port)
                hint = ""
                if "DataDirLockedError" in output:
                    hint = (
                        " (another process holds the data directory: a running `mmrag serve`, or `mmrag ingest` "
                        "or a batch job with the directory open in file mode; stop it or let it finish)"
                    )
                raise LiteServerError(f"the Milvus Lite server on {self.data_dir} exited with {code}{hint}:\n{output}")
            # Its own line, not an open port: another process may listen on the port we were given.
            if _READY in self.log_tail():
                return
            time.sleep(0.05)
        self._terminate(STOP_GRACE_S)
        raise LiteServerError(f"the Milvus Lite server on {self.data_dir} did not listen within {timeout_s:.0f} s")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def ensure_running(self, max_restarts: int = 3) -> bool:
        """True if the server runs (restarting it, on the same port, if it died and restarts are left)."""
        if self.alive():
            return True
        code = self.returncode
        if self.restarts >= max_restarts:
            return False
        self.restarts += 1
        logger.error(
            "the Milvus Lite server (pid %s, %s) exited with %s; restarting it (%d of %d). Its log: %s\n%s",
            self.pid,
            self.data_dir,
            code,
            self.restarts,
            max_restarts,
            self.log_file,
            self.log_tail(),
        )
        try:
            self._spawn(self.port or free_port(), START_TIMEOUT_S)
        except (LiteServerError, _PortTaken) as exc:
            logger.error("the Milvus Lite server did not restart: %s", exc)
            return False
        self._write_state()
        self._reload_collections()
        return True

    def _reload_collections(self, timeout_s: float = RELOAD_TIMEOUT_S) -> None:
        """Load every collection again after a restart. A restarted server has them all *released*, while its
        clients (the replicas' pymilvus channels reconnect by themselves) remember them loaded and load each
        only once per connection: without this every search failed with "call load() before search" until
        the replicas were restarted (measured: still failing 33 s after the restart). A collection that does not
        load is logged; its clients' searches fail as before."""
        from pymilvus import MilvusClient

        try:
            client = MilvusClient(uri=self.uri, timeout=timeout_s)
        except Exception as exc:  # pymilvus's own errors, gRPC's: logged, the server runs all the same
            logger.error("collections not reloaded after the Milvus Lite server's restart: %s", exc)
            return
        try:
            for name in client.list_collections(timeout=timeout_s):
                try:
                    client.load_collection(name, timeout=timeout_s)
                except Exception as exc:
                    logger.error("collection %s not reloaded after the Milvus Lite server's restart: %s", name, exc)
            logger.info("collections reloaded after the Milvus Lite server's restart")
        except Exception as exc:
            logger.error("collections not reloaded after the Milvus Lite server's restart: %s", exc)
        finally:
            client.close()

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """Stop the server (SIGINT, then SIGKILL after ``grace_s``) and remove its state file."""
        self._remove_state()
        return self._terminate(grace_s)

    def _terminate(self, grace_s: float) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("the Milvus Lite server did not stop within %.0f s; killing it", grace_s)
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, limit: int = 2000) -> str:
        """The end of what the current server process wrote (the log file keeps earlier runs too)."""
        try:
            with open(self.log_file, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(self._log_offset, log.tell() - limit))
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _write_state(self) -> None:
        state = {"uri": self.uri, "pid": self.pid, "owner_pid": os.getpid(), "data_dir": str(self.data_dir)}
        path = state_path(self.data_dir)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(state))
        os.replace(temporary, path)  # readers see the old file or the new one, never half of one

    def _remove_state(self) -> None:
        state = read_state(self.data_dir)
        if state is not None and state.owner_pid == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                state_path(self.data_dir).unlink()

    def __enter__(self) -> LiteServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _PortTaken(Exception):
    """The port was bound by another process first (we try another one)."""


# The child's entry point, then `milvus-lite` itself. SIGINT is its stop signal whatever the starting process
# did with it: a blocked SIGINT is inherited through exec (Ray starts its workers with it blocked) and an
# ignored one makes Python install no handler; in CI, stops from the test process ran into the 30 s grace and
# SIGKILL, not reproduced alone. On Linux, a SIGINT (milvus-lite's clean stop) when its
# parent dies, so a killed `mmrag serve` leaves no server holding the data directory (PR_SET_PDEATHSIG follows
# the parent *thread*: start servers from a thread that lives as long as they should). And gRPC without
# SO_REUSEPORT, which it sets by default on Linux: with it a second server binds a port already served and
# the two share its connections; without it a taken port fails the bind (and we pick another). And one write
# at a time: milvus-lite's server runs requests on a thread pool but its engine takes one writer per
# collection (its sequence numbers and WAL appends are not locked), so the calls that change anything are
# serialized here; searches and queries still run side by side.
_SERIALIZED = (
    "CreateCollection DropCollection RenameCollection AlterCollection TruncateCollection Insert Upsert Delete "
    "Flush CreateIndex DropIndex CreatePartition DropPartition LoadCollection ReleaseCollection ManualCompaction "
    "CreateDatabase DropDatabase AlterDatabase CreateAlias AlterAlias DropAlias"
)
_SHIM = """
import os, signal, sys
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
signal.signal(signal.SIGINT, signal.default_int_handler)
if sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGINT)
    if os.getppid() != int(sys.argv[1]):
        sys.exit("mmrag's Milvus Lite server: the parent process is gone")
import grpc
_grpc_server = grpc.server
def _server(*args, options=(), **kwargs):
    return _grpc_server(*args, options=[*options, ("grpc.so_reuseport", 0)], **kwargs)
grpc.server = _server
import threading
from milvus_lite.adapter.grpc.servicer import MilvusServicer
_writes = threading.RLock()
def _one_at_a_time(method):
    def call(self, request, context):
        with _writes:
            return method(self, request, context)
    return call
for _name in sys.argv[2].split():
    setattr(MilvusServicer, _name, _one_at_a_time(getattr(MilvusServicer, _name)))
from milvus_lite.cmdline import main
sys.argv = ["milvus-lite", *sys.argv[3:]]
sys.exit(main())
"""
