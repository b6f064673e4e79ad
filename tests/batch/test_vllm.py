"""One batch on the real engine, through the ``mmrag batch`` CLI: vLLM on the shipped trained model, its xRAG
projector loaded, documents in Milvus Lite. One engine start serves every kind of line: plain chats (greedy,
repeated), an image, two refused lines, and knowledge questions answered from retrieved documents as text and
as one ``<xrag>`` token each. (Plain and image lines ran on the tiny random LLaVA in a batch of their own, a
second engine start: the CLI's path for them does not depend on the model.)"""

from __future__ import annotations

import base64
import io
import subprocess

import pytest
from PIL import Image

from tests.batch.conftest import batch_command, batch_env, by_custom_id, chat_line, read_jsonl, write_jsonl

pytestmark = pytest.mark.slow

MODEL = "trained"
TASKS = 8


def _line(custom_id: str, text: str, **body) -> dict:
    line = chat_line(custom_id, text, **body)
    line["body"]["model"] = MODEL
    return line


def image_line(custom_id: str) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What colour?"}]
    line = _line(custom_id, "", max_tokens=6, temperature=0)
    line["body"]["messages"] = [{"role": "user", "content": content}]
    return line


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """(the CLI's stdout, the output records by custom_id, the knowledge tasks)."""
    from mmrag.serving.models.trained import trained_model_path, trained_projector_path
    from mmrag.training.tasks import make_task

    tmp_path = tmp_path_factory.mktemp("batch-vllm")
    tasks = [make_task("knowledge", i, split="heldout", max_documents=1) for i in range(TASKS)]
    corpus = tmp_path / "kb"
    corpus.mkdir()
    for i, task in enumerate(tasks):
        (corpus / f"{i}.txt").write_text(task.documents[0])
    overrides = [
        f"model.path={trained_model_path()}",
        f"model.served_name={MODEL}",
        "engine.max_model_len=1024",
        "engine.kv_cache_space_gib=1",
        f"retrieval.uri={tmp_path / 'kb.db'}",
        "retrieval.collection=kb",
        "retrieval.ingest_demo_corpus=false",
        f"retrieval.xrag.projector={trained_projector_path()}",
    ]
    settings = [a for o in overrides for a in ("--set", o)]
    ingest = [*batch_command()[:3], "ingest", str(corpus), "--no-progress", *settings]
    subprocess.run(ingest, check=True, capture_output=True, env=batch_env(), timeout=300)
    lines = [_line(f"q{i}", f"Tell me about item {i}.", max_tokens=8, temperature=0) for i in range(6)]
    lines += [
        _line("q0-again", "Tell me about item 0.", max_tokens=8, temperature=0),
        image_line("image"),
        _line("too-long", "hello", max_tokens=5000),
        _line("placeholder", "look: <image>"),
    ]
    for i, task in enumerate(tasks):
        for mode in ("xrag", "text"):
            retrieval = {"mode": mode, "top_k": 2}
            lines.append(_line(f"{mode}{i}", task.question, max_tokens=8, temperature=0, retrieval=retrieval))
    output = tmp_path / "out.jsonl"
    command = batch_command(str(write_jsonl(tmp_path / "in.jsonl", lines)), str(output), *settings)
    command += ["--concurrency", "8"]
    result = subprocess.run(command, capture_output=True, text=True, env=batch_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return result.stdout, by_custom_id(read_jsonl(output)), tasks


def test_plain_image_and_refused_lines(batch):
    stdout, records, tasks = batch
    assert f"done={8 + 2 * len(tasks)} failed=2 skipped=0" in stdout
    for custom_id in [f"q{i}" for i in range(6)] + ["q0-again", "image"]:
        body = records[custom_id]["response"]["body"]
        assert body["model"] == MODEL and body["usage"]["completion_tokens"] >= 1
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    text = [records[c]["response"]["body"]["choices"][0]["message"]["content"] for c in ("q0", "q0-again")]
    assert text[0] == text[1]  # greedy: the same prompt gives the same answer in one batch
    # The image expands into the model's image tokens, far more than its short text.
    image_usage = records["image"]["response"]["body"]["usage"]
    assert image_usage["prompt_tokens"] > records["q0"]["response"]["body"]["usage"]["prompt_tokens"]
    too_long = records["too-long"]
    assert too_long["response"]["status_code"] == 400 and too_long["error"]["line"] == 9
    assert too_long["response"]["body"]["error"]["code"] == "context_length_exceeded"
    placeholder = records["placeholder"]
    assert placeholder["response"]["status_code"] == 400 and placeholder["error"]["line"] == 10


def test_xrag_lines_on_the_trained_model(batch):
    """Knowledge questions answered from documents retrieved from Milvus Lite, one ``<xrag>`` token each."""
    _, records, tasks = batch
    bodies = {key: record["response"]["body"] for key, record in records.items()}
    for i in range(len(tasks)):
        xrag, text = bodies[f"xrag{i}"], bodies[f"text{i}"]
        assert xrag["retrieval"]["mode"] == "xrag" and xrag["retrieval"]["context_documents"] == 2
        assert [d["id"] for d in xrag["retrieval"]["documents"]] == [d["id"] for d in text["retrieval"]["documents"]]
        # the same two documents, one token each instead of about 40
        assert xrag["usage"]["prompt_tokens"] <= text["usage"]["prompt_tokens"] - 2 * 25
