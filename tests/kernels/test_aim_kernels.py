"""AIM stage (b): PageRank importance, the retention schedule and the live-token selection."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmrag.kernels.aim import AIMSchedule, pagerank_importance, select_live_tokens
from mmrag.kernels.selection import rank_by_tier

FAST = settings(max_examples=40, deadline=None, database=None)


def _naive_pagerank(logits: torch.Tensor, temperature: float, iterations: int) -> list[float]:
    """The authors' ``get_importance`` written out with Python floats, one head and one key at a time."""
    heads, n, _ = logits.shape
    per_head = []
    for h in range(heads):
        rows = []
        for i in range(n):
            scaled = [float(logits[h, i, j]) / temperature for j in range(n)]
            top = max(scaled)
            weights = [math.exp(s - top) if s != -math.inf else 0.0 for s in scaled]
            total = sum(weights)
            rows.append([w / total for w in weights])
        dist = [1.0 / n] * n
        for _ in range(iterations):
            dist = [sum(dist[i] * rows[i][j] for i in range(n)) for j in range(n)]
        per_head.append(dist)
    return [math.sqrt(sum(per_head[h][j] ** 2 for h in range(heads)) / heads) for j in range(n)]


def _causal_logits(seed: int, heads: int, n: int) -> torch.Tensor:
    logits = torch.randn(heads, n, n, generator=torch.Generator().manual_seed(seed))
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    return logits.masked_fill(future, torch.finfo(torch.float32).min)


@FAST
@given(seed=st.integers(0, 2**16), heads=st.integers(1, 3), n=st.integers(1, 9))
def test_pagerank_matches_the_authors_formula(seed: int, heads: int, n: int) -> None:
    logits = _causal_logits(seed, heads, n)
    got = pagerank_importance(logits, temperature=0.1, iterations=5)
    expected = torch.tensor(_naive_pagerank(logits, 0.1, 5), dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_pagerank_on_uniform_attention_is_uniform() -> None:
    # Each step keeps the uniform distribution, so every token has importance exactly 1/N in every head.
    importance = pagerank_importance(torch.zeros(4, 8, 8))
    torch.testing.assert_close(importance, torch.full((8,), 1 / 8))


def test_pagerank_batched_and_bf16_input() -> None:
    logits = _causal_logits(0, 2, 6)
    batched = pagerank_importance(torch.stack([logits, logits]))
    assert batched.shape == (2, 6)
    torch.testing.assert_close(batched[1], pagerank_importance(logits))
    assert pagerank_importance(logits.bfloat16()).dtype == torch.float32


def test_schedule_is_the_authors_llava_schedule() -> None:
    schedule = AIMSchedule(start_layer=13, end_layer=20)
    authors = [max(0, 1.0 - (layer - 13 + 1) * 0.125) if layer >= 13 else 1.0 for layer in range(32)]
    assert [schedule.retention(layer) for layer in range(32)] == authors
    for layer in range(32):
        assert schedule.keep_count(layer, 600, 24) == int((600 - 24) * authors[layer] + 24)
    # Qwen2-7B in the authors' code: 87.5% after layer 14, nothing after 21.
    qwen = AIMSchedule(start_layer=14, end_layer=21)
    assert qwen.retention(13) == 1.0 and qwen.retention(14) == 0.875 and qwen.retention(21) == 0.0


@FAST
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 30),
    keep_fraction=st.floats(0, 1),
    dead_fraction=st.floats(0, 0.5),
)
def test_selection_keeps_text_and_the_best_live_visual_tokens(
    seed: int, n: int, keep_fraction: float, dead_fraction: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    importance = torch.rand(n, generator=gen)
    is_text = torch.rand(n, generator=gen) < 0.3
    live = is_text | (torch.rand(n, generator=gen) >= dead_fraction)
    num_text = int(is_text.sum())
    keep = num_text + int((n - num_text) * keep_fraction)
    new_live = select_live_tokens(importance, is_text, live, keep)
    assert bool((new_live <= live).all()), "a pruned token came back"
    assert bool(new_live[is_text].all()), "a text token was pruned"
    visual_live = (live & ~is_text).nonzero()[:, 0].tolist()
    budget = keep - num_text
    best = sorted(visual_live, key=lambda j: (-float(importance[j]), j))[:budget]
    assert sorted((new_live & ~is_text).nonzero()[:, 0].tolist()) == sorted(best)


def test_rank_by_tier_survives_bf16() -> None:
    # Image scores 0.10 .. 0.17: distinct in bf16, equal once 65516 is subtracted (the published way).
    scores = torch.tensor([0.30, 0.10, 0.17, 0.12, 0.15], dtype=torch.bfloat16)
    is_text = torch.tensor([1, 0, 0, 0, 0])
    order = rank_by_tier(is_text, scores).tolist()
    assert order == [0, 2, 4, 3, 1]
    offset = scores - 65516 * (1 - is_text).to(torch.bfloat16)
    assert len(set(offset[1:].tolist())) == 1, "the pitfall this rule avoids has gone: revisit the note"
