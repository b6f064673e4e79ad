"""The trained model behind the real server (Ray Serve + vLLM + Milvus Lite), through the ``openai`` client:
it reads images sent as data URLs, and answers knowledge questions from documents it retrieves itself.

Its own server (the session server runs the random tiny model), started after ``mmrag ingest`` has put
held-out knowledge documents (entities never seen in training) into the server's Lite file.
"""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest

from mmrag.serving.models.trained import trained_model_path
from mmrag.serving.server_process import running_server
from mmrag.serving.tasks import make_task
from mmrag.serving.tasks.chat import openai_messages

pytestmark = pytest.mark.e2e
MODEL = "mmrag-tiny-mllm"
KNOWLEDGE = [make_task("knowledge", i, split="heldout", max_documents=1) for i in range(12)]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    work = tmp_path_factory.mktemp("trained")
    overrides = [
        f"model.path={trained_model_path()}",
        f"model.served_name={MODEL}",
        "engine.max_model_len=1024",
        "engine.kv_cache_space_gib=1",
        f"retrieval.uri={work / 'kb.db'}",
        "retrieval.collection=kb",
        "retrieval.ingest_demo_corpus=false",
    ]
    corpus = work / "kb.jsonl"
    corpus.write_text("".join(json.dumps({"text": t.documents[0]}) + "\n" for t in KNOWLEDGE))
    ingest = [sys.executable, "-m", "mmrag.serving.cli", "ingest", str(corpus), "--no-progress"]
    subprocess.run([*ingest, *(a for o in overrides for a in ("--set", o))], check=True, timeout=300)
    with running_server(overrides=overrides, cache_dir=work / "cache", log_path=work / "serve.log") as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(client, messages, **extra) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, extra_body=extra or None
    )


def test_answers_questions_about_images(client):
    """The families the model learnt (colour of image k, count, compare); about 0.9 of them right here."""
    tasks = [make_task(f, i, split="heldout", max_images=4) for f in ("colour", "count", "compare") for i in range(4)]
    answers = [_ask(client, openai_messages(t)).choices[0].message.content for t in tasks]
    correct = sum(a == t.answer for a, t in zip(answers, tasks, strict=True))
    assert correct >= 8, list(zip(answers, [t.answer for t in tasks], strict=True))


def test_answers_from_retrieved_documents_and_not_without(client):
    grounded = blind = 0
    for task in KNOWLEDGE:
        question = [{"role": "user", "content": task.question}]
        response = _ask(client, question, retrieval={"mode": "text", "top_k": 2})
        retrieved = response.model_extra["retrieval"]["documents"]
        assert len(retrieved) == 2
        grounded += response.choices[0].message.content == task.answer
        blind += _ask(client, question, retrieval={"mode": "none"}).choices[0].message.content == task.answer
    # The model answers about a third of knowledge questions from its documents (training.json) and can
    # only guess without them (held-out entities).
    assert grounded >= blind + 2, (grounded, blind)
