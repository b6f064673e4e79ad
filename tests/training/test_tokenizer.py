"""The task tokenizer: text round-trips, and with isolated spaces an answer is the document's own tokens."""

from __future__ import annotations

import pytest

from mmrag.serving.tasks import make_task
from mmrag.serving.training.data import encode_answer, encode_prompt
from mmrag.serving.training.tokenizer import train_tokenizer
from mmrag.serving.training.train_tiny import TrainConfig, _tokenizer_corpus


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return _tokenizer_corpus(TrainConfig())


def _contains(sequence: list[int], part: list[int]) -> bool:
    return any(sequence[i : i + len(part)] == part for i in range(len(sequence) - len(part) + 1))


def _copyable(tokenizer, tasks) -> float:
    """Share of knowledge answers whose tokens (eos dropped) occur as such in the prompt."""
    hits = [_contains(encode_prompt(t, tokenizer, 1), encode_answer(tokenizer, t.answer)[:-1]) for t in tasks]
    return sum(hits) / len(hits)


def test_isolated_spaces_make_answers_copyable(corpus):
    tasks = [make_task("knowledge", i, split="heldout", max_documents=3) for i in range(60)]
    attached = train_tokenizer(corpus, 512, 2048)
    isolated = train_tokenizer(corpus, 512, 2048, isolate_spaces=True)
    # Numbers are digits either way (never merged); colours and places only copy with isolated spaces.
    assert _copyable(isolated, tasks) == 1.0
    assert _copyable(attached, tasks) < 0.6
    for tokenizer in (attached, isolated):
        text = tasks[0].documents[0] + " Tarn Edda, 42."
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
