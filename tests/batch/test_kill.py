"""A running ``mmrag batch`` killed with SIGKILL mid-run, then rerun: every answer exactly once."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tests.batch.conftest import (
    FAKE_ENGINE,
    batch_command,
    batch_env,
    by_custom_id,
    chat_line,
    kill_group,
    read_jsonl,
    write_jsonl,
)

TOTAL = 40
KILL_AFTER_LINES = 8
WAIT_S = 120


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_lines(path, count: int, process: subprocess.Popen, log) -> int:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mmrag batch exited early ({process.returncode}):\n{log.read_text()[-3000:]}")
        if path.exists() and (lines := path.read_bytes().count(b"\n")) >= count:
            return lines
        time.sleep(0.05)
    pytest.fail(f"no {count} output lines after {WAIT_S}s:\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("kill_signal", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_kill_then_resume_loses_and_duplicates_nothing(tmp_path, kill_signal):
    # Each request holds the engine 0.3 s and four run at once: the kill lands mid-run.
    source = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"q{i:02d}", "sleep 0.3") for i in range(TOTAL)])
    output = tmp_path / "out.jsonl"
    log = tmp_path / "batch.log"
    command = batch_command(str(source), str(output), "--engine", FAKE_ENGINE, "--concurrency", "4")
    with log.open("w") as sink:
        process = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=batch_env(),
            start_new_session=True,
            # A shell that starts the suite in the background leaves SIGINT ignored, and an ignored signal
            # is inherited: Python would then never raise KeyboardInterrupt in the batch process.
            preexec_fn=_default_sigint,
        )
    try:
        wait_for_lines(output, KILL_AFTER_LINES, process, log)
        process.send_signal(kill_signal)
        process.wait(timeout=60)
    finally:
        kill_group(process)
    if kill_signal == signal.SIGINT:  # Ctrl-C: a clean exit that says how to resume
        assert process.returncode == 130 and "rerun the same command to resume" in log.read_text()
    first = read_jsonl(output)  # every line written before the kill is whole
    assert KILL_AFTER_LINES <= len(first) < TOTAL, "the kill did not land mid-run"
    assert all(r["error"] is None for r in first)

    rerun = subprocess.run(command, capture_output=True, text=True, env=batch_env(), timeout=WAIT_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"done={TOTAL - len(first)} failed=0 skipped={len(first)}" in rerun.stdout

    records = by_custom_id(read_jsonl(output))  # fails on any duplicate
    assert sorted(records) == [f"q{i:02d}" for i in range(TOTAL)]
    assert all(r["response"]["body"]["choices"][0]["message"]["content"] == "slept " for r in records.values())
    assert [r["custom_id"] for r in read_jsonl(output)[: len(first)]] == [r["custom_id"] for r in first]
