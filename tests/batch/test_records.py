"""The input envelope, duplicate ids and the output file's recovery, without running any engine."""

from __future__ import annotations

import json

import pytest

from mmrag.serving.batch.output import OutputWriter, recover_output
from mmrag.serving.batch.records import (
    BatchInputError,
    failure_record,
    invalid_line_record,
    parse_line,
    read_batch_input,
    success_record,
)
from mmrag.serving.errors import InvalidRequestError
from tests.batch.conftest import chat_line, write_jsonl


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{oops", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}), "custom_id"),
        (json.dumps({**chat_line("a", "hi"), "custom_id": 7}), "custom_id"),
        (json.dumps({**chat_line("a", "hi"), "method": "GET"}), "method must be 'POST'"),
        (json.dumps({**chat_line("a", "hi"), "url": "/v1/embeddings"}), "url must be '/v1/chat/completions'"),
        (json.dumps({**chat_line("a", "hi"), "body": "text"}), "body must be a JSON object"),
    ],
)
def test_invalid_envelopes(text, problem):
    line = parse_line(4, text)
    assert line.problem is not None and problem in line.problem
    assert line.line == 4 and line.body is None
    error = invalid_line_record(line)["error"]
    assert error["line"] == 4 and problem in error["message"]


def test_valid_line_keeps_body_and_id():
    line = parse_line(1, json.dumps(chat_line("q-1", "hello", max_tokens=3)))
    assert line.problem is None and line.custom_id == "q-1" and line.body["max_tokens"] == 3
    assert line.key == ("custom_id", "q-1")
    assert parse_line(9, "{").key == ("line", 9)


def test_blank_lines_skipped_and_numbers_are_file_lines(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line("a", "x"), "", "   ", chat_line("b", "y")])
    assert [(line.line, line.custom_id) for line in read_batch_input(path)] == [(1, "a"), (4, "b")]


def test_duplicate_ids_rejected_with_line_numbers(tmp_path):
    lines = [chat_line("a", "x"), chat_line("b", "y"), {**chat_line("a", "z"), "url": "/bad"}, chat_line("b", "w")]
    with pytest.raises(BatchInputError) as info:
        read_batch_input(write_jsonl(tmp_path / "in.jsonl", lines))
    assert "'a' on lines 1, 3" in str(info.value) and "'b' on lines 2, 4" in str(info.value)


def test_unreadable_input(tmp_path):
    with pytest.raises(BatchInputError, match="cannot read"):
        read_batch_input(tmp_path / "missing.jsonl")


def test_records_shape():
    line = parse_line(3, json.dumps(chat_line("c", "hi")))
    ok = success_record(line, "chatcmpl-1", {"id": "chatcmpl-1"})
    assert ok["id"].startswith("batch_req_") and ok["error"] is None
    assert ok["response"] == {"status_code": 200, "request_id": "chatcmpl-1", "body": {"id": "chatcmpl-1"}}
    failed = failure_record(line, "chatcmpl-2", InvalidRequestError("bad n", param="n"))
    assert failed["response"]["status_code"] == 400
    assert failed["response"]["body"]["error"] == {
        "message": "bad n",
        "type": "invalid_request_error",
        "param": "n",
        "code": None,
    }
    assert failed["error"] == {"code": "invalid_request_error", "message": "bad n", "line": 3}


def test_recover_missing_and_complete(tmp_path):
    path = tmp_path / "out.jsonl"
    assert recover_output(path) == set()
    with OutputWriter(path) as writer:
        writer.write(success_record(parse_line(1, json.dumps(chat_line("a", "x"))), "r", {}))
        writer.write(invalid_line_record(parse_line(2, "{")))
    assert recover_output(path) == {("custom_id", "a"), ("line", 2)}


def test_recover_cuts_a_partial_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    with OutputWriter(path) as writer:
        writer.write(success_record(parse_line(1, json.dumps(chat_line("a", "x"))), "r", {}))
    complete = path.read_bytes()
    path.write_bytes(complete + b'{"id":"batch_req_x","custom_id":"b","resp')
    assert recover_output(path) == {("custom_id", "a")}
    assert path.read_bytes() == complete


def test_recover_cuts_a_whole_json_without_newline(tmp_path):
    # A kill between the line and its newline: not known to be complete, so it is run again.
    path = tmp_path / "out.jsonl"
    with OutputWriter(path) as writer:
        writer.write(success_record(parse_line(1, json.dumps(chat_line("a", "x"))), "r", {}))
        writer.write(success_record(parse_line(2, json.dumps(chat_line("b", "y"))), "r", {}))
    first, second = path.read_text().splitlines(keepends=True)
    path.write_text(first + second.rstrip("\n"))
    assert recover_output(path) == {("custom_id", "a")}
    assert path.read_text() == first


def test_recover_refuses_a_foreign_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('not json\n{"custom_id": "a", "error": null}\n')
    with pytest.raises(BatchInputError, match="line 1 is not a batch output record"):
        recover_output(path)
    assert path.read_text().startswith("not json")
