"""Whole runs over the fake engine, in-process: round trip, per-line errors, resume, retrieval."""

from __future__ import annotations

import base64
import dataclasses
import io
import json

import pytest
from openai.types.chat import ChatCompletion
from PIL import Image

from mmrag.serving.batch.job import BatchOptions, run_batch
from mmrag.serving.batch.records import BatchInputError
from mmrag.serving.cli import main
from mmrag.serving.config import MmragConfig
from tests.batch.conftest import (
    FAKE_ENGINE,
    MODEL,
    PLAIN_SETTINGS,
    batch_config,
    by_custom_id,
    chat_line,
    read_jsonl,
    write_jsonl,
)

OPTIONS = BatchOptions(concurrency=4, engine_cls=FAKE_ENGINE, show_progress=False)


def png_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_round_trip(tmp_path, fake_config):
    image_message = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": png_url()}}, {"type": "text", "text": "red green"}],
    }
    lines = [chat_line(f"q{i}", f"word{i} two three", max_tokens=2) for i in range(10)]
    lines.append({**chat_line("img", ""), "body": {"model": MODEL, "messages": [image_message]}})
    lines.append(chat_line("n2", "a b", n=2, temperature=0.5))
    lines.append(chat_line("streamed", "x y", stream=True))
    output = tmp_path / "out.jsonl"
    summary = run_batch(write_jsonl(tmp_path / "in.jsonl", lines), output, fake_config, OPTIONS)

    records = by_custom_id(read_jsonl(output))
    assert set(records) == {line["custom_id"] for line in lines}
    for record in records.values():
        assert record["id"].startswith("batch_req_") and record["error"] is None
        assert record["response"]["status_code"] == 200
        body = ChatCompletion.model_validate(record["response"]["body"])  # the OpenAI SDK's own type
        assert body.id == record["response"]["request_id"] and body.model == MODEL
    assert records["q3"]["response"]["body"]["choices"][0]["message"]["content"] == "word3 two "
    assert records["q3"]["response"]["body"]["choices"][0]["finish_reason"] == "length"
    # The fake engine counts 16 tokens per image and far fewer for this text: the image got through.
    assert records["img"]["response"]["body"]["usage"]["prompt_tokens"] >= 16
    assert [c["message"]["content"] for c in records["n2"]["response"]["body"]["choices"]] == ["a b ", "a b "]
    assert records["streamed"]["response"]["body"]["object"] == "chat.completion"
    assert (summary.done, summary.failed, summary.skipped) == (13, 0, 0)
    usages = [r["response"]["body"]["usage"] for r in records.values()]
    assert summary.prompt_tokens == sum(u["prompt_tokens"] for u in usages)
    assert summary.completion_tokens == sum(u["completion_tokens"] for u in usages) == 10 * 2 + 2 + 4 + 2


def test_per_line_errors_do_not_stop_the_job(tmp_path, fake_config):
    lines = [
        chat_line("ok-1", "fine"),
        "{broken",
        {**chat_line("wrong-url", "x"), "url": "/v1/completions"},
        {"custom_id": "no-messages", "method": "POST", "url": "/v1/chat/completions", "body": {"model": MODEL}},
        {**chat_line("bad-model", "x"), "body": {**chat_line("", "x")["body"], "model": "gpt-9"}},
        chat_line("bad-n", "x", n=99),
        chat_line("too-long", " ".join(["w"] * 3000)),
        chat_line("ok-2", "also fine"),
    ]
    output = tmp_path / "out.jsonl"
    summary = run_batch(write_jsonl(tmp_path / "in.jsonl", lines), output, fake_config, OPTIONS)
    assert (summary.done, summary.failed) == (2, 6)

    records = read_jsonl(output)
    (broken,) = [r for r in records if r["custom_id"] is None]
    assert broken["response"] is None and broken["error"]["line"] == 2
    assert broken["error"]["code"] == "invalid_batch_line" and "not valid JSON" in broken["error"]["message"]
    named = by_custom_id([r for r in records if r["custom_id"] is not None])
    assert named["wrong-url"]["response"] is None and named["wrong-url"]["error"]["line"] == 3
    expected = {"no-messages": (4, 400, "messages"), "bad-model": (5, 404, "model"), "bad-n": (6, 400, "n")}
    expected["too-long"] = (7, 400, "messages")
    for custom_id, (number, status, param) in expected.items():
        record = named[custom_id]
        assert record["error"]["line"] == number
        assert record["response"]["status_code"] == status
        assert record["response"]["body"]["error"]["param"] == param
    assert named["ok-1"]["error"] is None and named["ok-2"]["error"] is None


def test_resume_skips_answered_lines_and_broken_ones(tmp_path, fake_config):
    lines = [chat_line(f"q{i}", f"answer {i}") for i in range(6)] + ["{broken"]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out.jsonl"
    first = run_batch(source, output, fake_config, OPTIONS)
    assert (first.done, first.failed, first.skipped) == (6, 1, 0)
    before = output.read_text()

    again = run_batch(source, output, fake_config, OPTIONS)
    assert (again.done, again.failed, again.skipped) == (0, 0, 7)
    assert output.read_text() == before

    # Drop two answers and half-write a third: exactly those run again.
    kept = before.splitlines(keepends=True)
    dropped = {json.loads(line)["custom_id"] for line in kept[-3:]}
    output.write_text("".join(kept[:-3]) + kept[-3][: len(kept[-3]) // 2])
    third = run_batch(source, output, fake_config, OPTIONS)
    assert third.skipped == 4 and third.done + third.failed == 3
    records = read_jsonl(output)
    assert len(records) == 7
    assert len({r["custom_id"] for r in records}) == 7  # six ids and one None (the broken line)
    assert dropped <= {r["custom_id"] for r in records}


def test_duplicates_rejected_before_any_work(tmp_path, fake_config, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [chat_line("a", "x"), chat_line("b", "y"), chat_line("a", "z")])
    output = tmp_path / "out.jsonl"
    with pytest.raises(BatchInputError, match="'a' on lines 1, 3"):
        run_batch(source, output, fake_config, OPTIONS)
    assert not output.exists()
    assert main(["batch", str(source), str(output), "--engine", FAKE_ENGINE, "--no-progress"]) == 2
    assert "duplicate custom_id" in capsys.readouterr().err
    assert not output.exists()


def test_cli_summary(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [chat_line("a", "one two"), chat_line("b", "three")])
    output = tmp_path / "out.jsonl"
    argv = ["batch", str(source), str(output), "--engine", FAKE_ENGINE, "--no-progress", "--concurrency", "2"]
    argv += PLAIN_SETTINGS
    assert main([*argv, "--set", "limits.max_n=2"]) == 0
    summary = capsys.readouterr().out
    assert "done=2 failed=0 skipped=0 prompt_tokens=3 completion_tokens=3" in summary
    assert main(argv) == 0
    assert "done=0 failed=0 skipped=2" in capsys.readouterr().out


@pytest.mark.slow
def test_text_retrieval_in_batch(tmp_path, monkeypatch):
    """The retrieval extension goes through the real retriever (MiniLM + Milvus Lite, demo corpus)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = batch_config({"retrieval": {"uri": str(tmp_path / "milvus.db")}})
    lines = [
        chat_line("rag", "How long is the Kessel Span?", retrieval={"mode": "text", "top_k": 2}),
        chat_line("plain", "no retrieval here"),
        chat_line("bad-rag", "x", retrieval={"mode": "text", "top_k": 0}),
    ]
    output = tmp_path / "out.jsonl"
    options = dataclasses.replace(OPTIONS, engine_cls="tests.batch.engines:RetrievalEchoEngine")
    summary = run_batch(write_jsonl(tmp_path / "in.jsonl", lines), output, config, options)
    records = by_custom_id(read_jsonl(output))
    documents = records["rag"]["response"]["body"]["retrieval"]["documents"]
    assert len(documents) == 2 and all(d["source"] for d in documents)
    assert records["plain"]["response"]["body"].get("retrieval") is None
    assert records["bad-rag"]["response"]["status_code"] == 400
    assert (summary.done, summary.failed) == (2, 1)


def test_oversized_body_is_a_413_for_its_line(tmp_path):
    config = batch_config({"limits": {"max_request_bytes": 200}})
    lines = [chat_line("small", "hi"), chat_line("big", "word " * 100)]
    output = tmp_path / "out.jsonl"
    summary = run_batch(write_jsonl(tmp_path / "in.jsonl", lines), output, config, OPTIONS)
    records = by_custom_id(read_jsonl(output))
    assert records["big"]["response"]["status_code"] == 413 and records["big"]["error"]["line"] == 2
    assert records["small"]["error"] is None and (summary.done, summary.failed) == (1, 1)


def test_batch_engines_skip_vllm_stats_unless_configured():
    from mmrag.serving.batch.local import without_engine_stats

    default = MmragConfig()
    assert without_engine_stats(default).engine.engine_kwargs == {"disable_log_stats": True}
    assert default.engine.engine_kwargs == {}  # the caller's config is not modified
    chosen = MmragConfig.model_validate({"engine": {"engine_kwargs": {"disable_log_stats": False}}})
    assert without_engine_stats(chosen).engine.engine_kwargs == {"disable_log_stats": False}
