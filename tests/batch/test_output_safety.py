"""An existing output file that is not a batch output of ours is refused, untouched (issue 31): resuming used to
cut the last line of any file lacking a trailing newline, so a one-line unrelated file ended up empty. Resume
into a real partial output (a torn last line of ours) keeps working."""

from __future__ import annotations

import json
import os

import pytest

from mmrag.serving.batch.output import RECORD_START, OutputWriter, recover_output
from mmrag.serving.batch.records import (
    BatchInputError,
    failure_record,
    invalid_line_record,
    parse_line,
    success_record,
)
from mmrag.serving.cli import main
from mmrag.serving.errors import InvalidRequestError
from tests.batch.conftest import FAKE_ENGINE, PLAIN_SETTINGS, chat_line, read_jsonl, write_jsonl

FOREIGN = {
    "one line, no newline": b"my thesis, chapter 1",
    "one JSON line, no newline": b'{"custom_id": "a", "note": "mine"}',
    "a record-like line without its id": b'{"custom_id": "a", "response": null, "error": null}\n',
    "prose whose last line has no newline": b"line one\nline two",
    "a short line": b"{",
    "a batch input file": (json.dumps(chat_line("a", "x")) + "\n" + json.dumps(chat_line("b", "y"))).encode(),
    "ours, then someone else's last line": None,  # built in the test: a record, then an unrelated tail
    "binary": bytes(range(256)),
}


def our_record(custom_id: str, line: int = 1) -> dict:
    return success_record(parse_line(line, json.dumps(chat_line(custom_id, "x"))), "req", {"choices": []})


def written(path, *records) -> bytes:
    with OutputWriter(path) as writer:
        for record in records:
            writer.write(record)
    return path.read_bytes()


@pytest.mark.parametrize("name", list(FOREIGN))
def test_a_file_that_is_not_ours_is_refused_untouched(tmp_path, name):
    path = tmp_path / "out.jsonl"
    content = FOREIGN[name]
    if content is None:
        content = written(path, our_record("a")) + b"an unrelated last line"
    path.write_bytes(content)
    with pytest.raises(BatchInputError, match="not a batch output record"):
        recover_output(path)
    assert path.read_bytes() == content


def test_every_record_we_write_begins_as_a_torn_line_is_recognised(tmp_path):
    # The torn-line rule relies on this prefix; a new record builder must keep it.
    line = parse_line(3, json.dumps(chat_line("c", "x")))
    records = [
        our_record("a"),
        failure_record(line, "req", InvalidRequestError("bad", param="x")),
        invalid_line_record(parse_line(4, "{")),
    ]
    for record in records:
        path = tmp_path / "one.jsonl"
        path.unlink(missing_ok=True)
        assert written(path, record).startswith(RECORD_START)


@pytest.mark.parametrize("cut", [5, len(RECORD_START), 40, -1])
def test_a_torn_last_line_of_ours_is_still_dropped(tmp_path, cut):
    path = tmp_path / "out.jsonl"
    whole = written(path, our_record("a"), our_record("b", 2))
    first_length = whole.index(b"\n") + 1
    path.write_bytes(whole[: len(whole) + cut if cut < 0 else first_length + cut])
    assert recover_output(path) == {("custom_id", "a")}
    assert path.read_bytes() == whole[:first_length]


def test_a_lone_torn_line_of_ours_is_dropped_but_a_lone_short_fragment_is_not(tmp_path):
    path = tmp_path / "out.jsonl"
    whole = written(path, our_record("a"))
    path.write_bytes(whole[:60])  # killed during the very first write
    assert recover_output(path) == set() and path.read_bytes() == b""
    path.write_bytes(RECORD_START[:5])  # too short to tell from someone else's file: refused
    with pytest.raises(BatchInputError):
        recover_output(path)
    assert path.read_bytes() == RECORD_START[:5]


def test_blank_lines_and_an_empty_file_are_fine(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"")
    assert recover_output(path) == set()
    whole = written(path, our_record("a"))
    path.write_bytes(b"\n" + whole + b"  \n")
    assert recover_output(path) == {("custom_id", "a")}
    assert path.read_bytes() == b"\n" + whole + b"  \n"


def test_an_unreadable_output_path_is_a_clear_error(tmp_path):
    with pytest.raises(BatchInputError, match="cannot read the output file"):
        recover_output(tmp_path)  # a directory


def run_cli(source, output) -> int:
    return main(["batch", str(source), str(output), "--engine", FAKE_ENGINE, "--no-progress", *PLAIN_SETTINGS])


def test_the_cli_refuses_a_foreign_output_with_exit_2_and_writes_nothing(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [chat_line("a", "x"), chat_line("b", "y")])
    output = tmp_path / "notes.txt"
    output.write_bytes(b"do not lose this line")
    os.utime(output, (1_000_000_000, 1_000_000_000))
    assert run_cli(source, output) == 2
    assert "not a batch output record" in capsys.readouterr().err
    assert output.read_bytes() == b"do not lose this line" and output.stat().st_mtime == 1_000_000_000


def test_the_cli_refuses_the_input_as_its_output(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [chat_line("a", "x")])
    before = source.read_bytes()
    assert run_cli(source, source) == 2
    assert "is the input file" in capsys.readouterr().err
    assert source.read_bytes() == before


def test_the_cli_resumes_into_a_torn_output_of_its_own(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"q{i}", f"answer {i}") for i in range(4)])
    output = tmp_path / "out.jsonl"
    assert run_cli(source, output) == 0
    lines = output.read_bytes().splitlines(keepends=True)
    output.write_bytes(b"".join(lines[:2]) + lines[2][:30])  # killed mid-line: two answers kept
    assert run_cli(source, output) == 0
    records = read_jsonl(output)
    assert sorted(r["custom_id"] for r in records) == ["q0", "q1", "q2", "q3"]
    assert output.read_bytes().startswith(b"".join(lines[:2]))
