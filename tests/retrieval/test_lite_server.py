"""The Milvus Lite server supervisor (``serving/retrieval/lite_server.py``) with the real ``milvus-lite server``:
start on a free loopback port, the state file other processes find it by, a clean stop, a death that is
reported and restarted, a data directory another process holds, and a store that connects to it."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest

from mmrag.serving.retrieval.config import RetrievalConfig
from mmrag.serving.retrieval.lite_server import LiteServer, LiteServerError, find_running, port_open, state_path


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    """One server for the tests that leave it running (each start costs 1.5 to 2.5 s here)."""
    server = LiteServer(tmp_path_factory.mktemp("lite") / "milvus.db")
    server.start()
    yield server
    server.stop()


def test_starts_on_loopback_and_records_itself(lite):
    assert lite.uri.startswith("http://127.0.0.1:") and port_open(lite.uri)
    state = json.loads(state_path(lite.data_dir).read_text())
    assert state == {"uri": lite.uri, "pid": lite.pid, "owner_pid": os.getpid(), "data_dir": str(lite.data_dir)}
    assert find_running(lite.data_dir).uri == lite.uri
    assert find_running(lite.data_dir.with_name("other.db")) is None


def test_a_death_is_reported_and_restarted_on_its_port_then_a_stop_is_clean_and_final(tmp_path, caplog):
    lite = LiteServer(tmp_path / "milvus.db")
    lite.start()
    port, first = lite.port, lite.pid
    os.kill(first, signal.SIGKILL)
    lite.process.wait()
    assert not lite.alive() and lite.returncode == -signal.SIGKILL
    assert find_running(lite.data_dir) is None  # the state file is stale: its process is gone
    with caplog.at_level(logging.ERROR, logger="mmrag.serving.retrieval.lite_server"):
        assert lite.ensure_running(max_restarts=1)
    assert f"exited with {-signal.SIGKILL}; restarting it (1 of 1)" in caplog.text
    assert (lite.port, find_running(lite.data_dir).pid) == (port, lite.pid) and lite.pid != first
    # SIGINT: milvus-lite closes the directory and exits 0; on a loaded machine a just-restarted server was
    # once ended by the signal itself (-2) before its handler was in place (CI, load ~10). Either way it is gone.
    assert lite.stop() in (0, -signal.SIGINT)
    assert not lite.alive()
    assert not state_path(lite.data_dir).exists() and find_running(lite.data_dir) is None
    assert not port_open(lite.uri)
    assert lite.ensure_running(max_restarts=1) is False  # restarts used up: `mmrag serve` stops serving


def test_a_data_directory_held_in_process_is_a_clear_error(tmp_path):
    from mmrag.serving.retrieval.store import MilvusStore

    held = MilvusStore(RetrievalConfig(uri=str(tmp_path / "milvus.db"), milvus_lite_server=False))
    try:
        with pytest.raises(LiteServerError, match="another process holds the data directory"):
            LiteServer(tmp_path / "milvus.db").start()
    finally:
        held.close()
    assert not state_path(tmp_path / "milvus.db").exists()


def test_a_taken_port_and_an_old_single_file_database_are_refused(lite, tmp_path):
    """(An old milvus-lite's .db was one file; milvus-lite 3 opens a directory, in either mode.)"""
    with pytest.raises(LiteServerError, match=f"port {lite.port} is in use"):
        LiteServer(tmp_path / "second.db", port=lite.port).start()
    old = tmp_path / "old.db"
    old.write_bytes(b"SQLite format 3\x00")
    with pytest.raises(LiteServerError, match="is a file, not a Milvus Lite 3 data directory"):
        LiteServer(old).start()


def test_a_stale_state_file_is_ignored(tmp_path):
    data_dir = (tmp_path / "milvus.db").resolve()
    state = {"uri": "http://127.0.0.1:9", "pid": 2**22 + 12345, "owner_pid": 1, "data_dir": str(data_dir)}
    state_path(data_dir).write_text(json.dumps(state))
    assert find_running(data_dir) is None
    state_path(data_dir).write_text("{not json")
    assert find_running(data_dir) is None


def test_stores_use_the_running_server_unless_told_to_open_the_directory(lite):
    from mmrag.serving.retrieval.errors import StoreUnreachableError
    from mmrag.serving.retrieval.store import MilvusStore

    shared = RetrievalConfig(uri=str(lite.data_dir))
    first, second = MilvusStore(shared), MilvusStore(shared)  # both through the server: no lock taken here
    try:
        assert first.lite_server == second.lite_server == lite.uri == first.uri
        assert first.list_collections() == []
        # File mode on a directory the server holds: the lock error, with the hint.
        with pytest.raises(StoreUnreachableError, match="Milvus Lite allows one process per file"):
            MilvusStore(shared.model_copy(update={"milvus_lite_server": False})).list_collections()
    finally:
        first.close()
        second.close()
    named = MilvusStore(RetrievalConfig(uri=str(lite.data_dir), lite_server_uri=lite.uri))
    named.close()
    assert named.lite_server == lite.uri


def test_health_fails_while_the_server_is_down(lite):
    from mmrag.serving.retrieval.errors import StoreUnreachableError
    from mmrag.serving.retrieval.retriever import Retriever

    config = RetrievalConfig(uri=str(lite.data_dir), lite_server_uri=lite.uri, connect_timeout_s=1.0)
    retriever = Retriever(config, encoder=object())  # health reads no vectors
    try:
        retriever.check_health()
        lite.process.send_signal(signal.SIGKILL)
        lite.process.wait()
        with pytest.raises(StoreUnreachableError):
            retriever.check_health()
        assert lite.ensure_running(max_restarts=1)  # on its port: the same URI answers again
        retriever.check_health()
    finally:
        retriever.close()


def test_concurrent_writers_to_one_collection_lose_nothing(lite):
    """Writes are serialized in the server (milvus-lite's engine has one writer per collection): six clients
    upserting into one collection at once, with flushes among them, leave every row (an unpatched
    `milvus-lite server` lost 950 of 12000 such rows in one of two trial runs here)."""
    import threading

    from pymilvus import MilvusClient

    MilvusClient(lite.uri).create_collection("concurrent", dimension=4)
    failures: list[BaseException] = []

    def write(writer: int) -> None:
        client = MilvusClient(lite.uri)
        try:
            for batch in range(20):
                rows = [
                    {"id": writer * 10_000 + batch * 50 + i, "vector": [0.1, 0.2, 0.3, float(i)]} for i in range(50)
                ]
                client.upsert("concurrent", rows)
                if batch % 5 == 0:
                    client.flush("concurrent")
        except BaseException as exc:  # reported below: a thread's exception would otherwise vanish
            failures.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=write, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    client = MilvusClient(lite.uri)
    client.flush("concurrent")
    client.load_collection("concurrent")
    assert client.query("concurrent", filter="", output_fields=["count(*)"])[0]["count(*)"] == 6 * 20 * 50
    client.close()


def test_mmrag_serve_starts_one_joins_a_running_one_or_leaves_the_path_alone(lite, tmp_path):
    """`mmrag serve`'s step before Serve (serving/cli/serve.py): on a Lite path it starts the server and hands
    its URI to the replicas' config; one already running on the path is joined (not owned, not stopped); a
    Milvus server URI or the in-process mode start nothing."""
    from mmrag.serving.cli.serve import start_lite_server
    from mmrag.serving.config import MmragConfig

    def config(**retrieval):
        return MmragConfig.model_validate({"retrieval": retrieval})

    own = config(uri=str(tmp_path / "milvus.db"))
    started = start_lite_server(own)
    try:
        assert started is not None and started.alive()
        assert own.retrieval.lite_server_uri == started.uri and own.retrieval.shares_lite()
    finally:
        started.stop()
    joining = config(uri=str(lite.data_dir))
    assert start_lite_server(joining) is None and joining.retrieval.lite_server_uri == lite.uri
    for alone in (config(uri="http://127.0.0.1:19530"), config(uri=str(tmp_path / "x.db"), milvus_lite_server=False)):
        assert start_lite_server(alone) is None and alone.retrieval.lite_server_uri is None


def test_a_server_started_with_sigint_blocked_still_stops_cleanly_on_sigint(tmp_path):
    """A blocked SIGINT is inherited through exec (Ray starts its workers with it blocked); in CI something before
    these tests left it blocked in the test process, and every Lite server it started ignored its stop signal
    until the grace ran out and SIGKILL ended it. The server's entry point unblocks it (before the fix: -9)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        lite = LiteServer(tmp_path / "milvus.db")
        lite.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    assert lite.stop(grace_s=20) == 0
