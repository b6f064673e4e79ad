"""The templated SSE chunk writer gives, byte for byte, what building and dumping each chunk gives."""

from __future__ import annotations

import json

import pytest

from mmrag.serving.engine.protocol import CompressionCounts, GenerationDelta, TokenLogprob
from mmrag.serving.openai import chat
from mmrag.serving.openai.streaming import ChunkEvents, sse
from mmrag.serving.retrieval.protocol import RetrievalInfo

IDS = {"completion_id": "chatcmpl-x", "created": 1700000000, "model": "m"}


def _render(delta: GenerationDelta, first: bool) -> dict:
    return chat.chunk_of(delta, first=first, **IDS).model_dump()


def _delta(text: str, index: int = 0, finish: str | None = None, **extra) -> GenerationDelta:
    return GenerationDelta(index=index, text=text, finish_reason=finish, prompt_tokens=3, completion_tokens=7, **extra)


TEXTS = ["", "a", ' "quoted" \\ back', "line\nbreak\ttab", "émoji 🤖 and \u2028", "\x00\x1f", "{}</s>"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize(("index", "finish"), [(0, None), (2, None), (0, "stop"), (1, "length")])
def test_templated_events_equal_the_rendered_chunk(text: str, first: bool, index: int, finish: str | None) -> None:
    events = ChunkEvents(_render)
    delta = _delta(text, index, finish)
    # The template is built on the first delta of a shape, reused from the second on: both must match.
    warm = events.event(_delta("warm-up", index, finish), first=first)
    assert warm == sse(_render(_delta("warm-up", index, finish), first))
    assert events.event(delta, first=first) == sse(_render(delta, first))
    assert json.loads(events.event(delta, first=first)[len("data: ") :])["choices"][0]["delta"]["content"] == text


def test_compression_counts_do_not_change_the_chunk() -> None:
    events = ChunkEvents(_render)
    counts = CompressionCounts(visual_before=10, visual_after=5, kv_prompt=20, kv_kept=20)
    for text in ("a", "b"):
        delta = _delta(text, compression=counts)
        assert events.event(delta, first=False) == sse(_render(delta, False))


def test_retrieval_and_logprobs_are_rendered_in_full() -> None:
    calls: list[GenerationDelta] = []

    def render(delta: GenerationDelta, first: bool) -> dict:
        calls.append(delta)
        return _render(delta, first)

    events = ChunkEvents(render)
    with_retrieval = _delta("a", retrieval=RetrievalInfo(mode="text"))
    with_logprobs = _delta("b", logprobs=(TokenLogprob("b", -0.5, (("b", -0.5), ("c", -1.5))),))
    for delta in (with_retrieval, with_logprobs, with_logprobs):
        assert events.event(delta, first=False) == sse(_render(delta, False))
    assert calls == [with_retrieval, with_logprobs, with_logprobs]  # no template stands in for them


def test_a_render_that_changes_the_text_gets_no_template() -> None:
    def shouting(delta: GenerationDelta, first: bool) -> dict:
        return _render(GenerationDelta(**{**delta.__dict__, "text": delta.text.upper()}), first)

    events = ChunkEvents(shouting)
    for text in ("quiet", "still quiet"):
        assert events.event(_delta(text), first=False) == sse(shouting(_delta(text), False))
