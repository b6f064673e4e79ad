"""Bipartite merge (AIM stage a, ToMe): counts, bookkeeping, and the formulas against a naive loop."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmrag.kernels.token_merge import bipartite_soft_matching, merge_tokens, merged_token_count, spread_positions

FAST = settings(max_examples=40, deadline=None, database=None)


def _features(seed: int, frames: int, tokens: int, channels: int = 6) -> torch.Tensor:
    return torch.randn(frames, tokens, channels, generator=torch.Generator().manual_seed(seed))


def _group_mean(x: torch.Tensor, index: torch.Tensor, slots: int) -> torch.Tensor:
    """``(F, slots, C)``: mean of the input tokens of each output slot, computed by plain loops."""
    out = torch.zeros(x.shape[0], slots, x.shape[2], dtype=torch.float64)
    for f in range(x.shape[0]):
        for slot in range(slots):
            out[f, slot] = x[f, index[f] == slot].double().mean(dim=0)
    return out


def _naive_single_pass(x: torch.Tensor, r: int) -> torch.Tensor:
    """One ToMe/AIM pass written from the definition, one frame and one token at a time."""
    frames, tokens, _ = x.shape
    r = min(r, tokens // 2)
    outs = []
    for f in range(frames):
        a = [x[f, i] for i in range(0, tokens, 2)]
        b = [x[f, i].clone() for i in range(1, tokens, 2)]
        best = []
        for i, ai in enumerate(a):
            sims = [torch.nn.functional.cosine_similarity(ai.float(), bj.float(), dim=0) for bj in b]
            j = max(range(len(b)), key=lambda jj: (float(sims[jj]), -jj))
            best.append((float(sims[j]), i, j))
        # Highest similarity first; ties by position (the stable sort of the kernel).
        order = sorted(best, key=lambda t: (-t[0], t[1]))
        merged, kept = order[:r], order[r:]
        groups: dict[int, list[torch.Tensor]] = {j: [b[j]] for j in range(len(b))}
        for _, i, j in merged:
            groups[j].append(a[i])
        outs.append(torch.stack([a[i] for _, i, _ in kept] + [torch.stack(groups[j]).mean(0) for j in range(len(b))]))
    return torch.stack(outs)


@FAST
@given(
    seed=st.integers(0, 2**16),
    frames=st.integers(1, 3),
    tokens=st.integers(1, 33),
    r=st.integers(0, 20),
)
def test_one_pass_count_and_bookkeeping(seed: int, frames: int, tokens: int, r: int) -> None:
    x = _features(seed, frames, tokens)
    match = bipartite_soft_matching(x, r)
    out = match.merge(x)
    assert out.shape == (frames, tokens - min(r, tokens // 2), x.shape[2])
    index = match.output_index()
    # Every input token lands in exactly one output slot and every slot receives at least one.
    assert index.shape == (frames, tokens)
    for f in range(frames):
        assert set(index[f].tolist()) == set(range(out.shape[1]))
    # One unweighted pass: each output is the plain mean of its inputs.
    torch.testing.assert_close(out.double(), _group_mean(x, index, out.shape[1]), rtol=1e-5, atol=1e-6)


@FAST
@given(seed=st.integers(0, 2**16), tokens=st.integers(2, 24), r=st.integers(1, 12))
def test_one_pass_matches_naive_loop(seed: int, tokens: int, r: int) -> None:
    x = _features(seed, 2, tokens)
    torch.testing.assert_close(bipartite_soft_matching(x, r).merge(x), _naive_single_pass(x, r))


@FAST
@given(seed=st.integers(0, 2**16), tokens=st.integers(1, 20), frames=st.integers(1, 3))
def test_nothing_merged_is_identity(seed: int, tokens: int, frames: int) -> None:
    x = _features(seed, frames, tokens)
    result = merge_tokens(x, num_passes=0)
    assert torch.equal(result.tokens, x)
    assert torch.equal(result.source_index, torch.arange(tokens).expand(frames, -1))
    assert torch.equal(bipartite_soft_matching(x, 0).merge(x), x)


@FAST
@given(
    seed=st.integers(0, 2**16),
    tokens=st.integers(1, 40),
    passes=st.integers(1, 3),
    weighted=st.booleans(),
)
def test_passes_count_and_sizes(seed: int, tokens: int, passes: int, weighted: bool) -> None:
    x = _features(seed, 2, tokens)
    result = merge_tokens(x, passes, weighted=weighted)
    expected = merged_token_count(tokens, passes)
    assert result.tokens.shape[1] == expected
    # Independent of the data: what a server reserves as placeholders before seeing the image.
    assert merge_tokens(x * -3 + 1, passes, weighted=weighted).tokens.shape[1] == expected
    for f in range(2):
        counts = torch.bincount(result.source_index[f], minlength=expected)
        assert torch.equal(counts.to(result.size.dtype), result.size[f])
    assert float(result.size.sum()) == 2 * tokens


@FAST
@given(seed=st.integers(0, 2**16), tokens=st.integers(4, 40), passes=st.integers(2, 3))
def test_size_weighted_is_exact_group_mean_after_many_passes(seed: int, tokens: int, passes: int) -> None:
    x = _features(seed, 2, tokens)
    result = merge_tokens(x, passes, weighted=True)
    expected = _group_mean(x, result.source_index, result.tokens.shape[1])
    torch.testing.assert_close(result.tokens.double(), expected, rtol=1e-5, atol=1e-6)


def test_aim_unweighted_is_a_mean_of_means() -> None:
    # Four tokens in one frame: pass 1 merges 0->1 and 2->3 (A into B); pass 2 merges the two results.
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]])
    x[0, 0] = torch.tensor([3.0, 0.0])  # same direction as token 1, other magnitude
    two = merge_tokens(x, 2)
    assert two.tokens.shape == (1, 1, 2)
    first = torch.stack([(x[0, 0] + x[0, 1]) / 2, (x[0, 2] + x[0, 3]) / 2])
    torch.testing.assert_close(two.tokens[0, 0], first.mean(0))
    weighted = merge_tokens(x, 2, weighted=True)
    torch.testing.assert_close(weighted.tokens[0, 0], x[0].mean(0))


def test_aim_counts() -> None:
    # LLaVA-OneVision per frame: 196 -> 98 -> 49 (AIM's two calls with r = T // 2); odd counts too.
    assert merged_token_count(196, 2) == 49
    assert merged_token_count(576, 1) == 288
    assert merged_token_count(16, 2) == 4
    assert merged_token_count(15, 1) == 8
    assert merge_tokens(torch.randn(3, 196, 8), 2).tokens.shape == (3, 49, 8)


def test_ties_are_deterministic() -> None:
    x = torch.ones(2, 10, 4)
    first = merge_tokens(x, 1)
    again = merge_tokens(x.clone(), 1)
    assert torch.equal(first.source_index, again.source_index)
    # All similarities equal: the stable sort merges A tokens in position order.
    match = bipartite_soft_matching(x, 3)
    assert match.src_idx[0].tolist() == [0, 1, 2]
    assert match.unmerged_idx[0].tolist() == [3, 4]


@pytest.mark.parametrize(
    ("tokens", "kept", "expected"),
    [
        (16, 8, [1, 3, 5, 7, 9, 11, 13, 15]),
        (16, 4, [2, 6, 10, 14]),
        (16, 1, [8]),
        (5, 5, [0, 1, 2, 3, 4]),
        (5, 2, [1, 3]),
    ],
)
def test_spread_positions_centre_each_share_of_the_span(tokens: int, kept: int, expected: list[int]) -> None:
    assert spread_positions(tokens, kept) == expected


@pytest.mark.parametrize("tokens", [1, 2, 7, 16, 49, 196, 576])
def test_spread_positions_are_increasing_inside_the_span(tokens: int) -> None:
    for kept in range(1, tokens + 1):
        offsets = spread_positions(tokens, kept)
        assert len(offsets) == kept and offsets[0] >= 0 and offsets[-1] < tokens
        assert all(a < b for a, b in itertools.pairwise(offsets))


def test_spread_positions_refuse_impossible_counts() -> None:
    for tokens, kept in ((16, 0), (16, 17)):
        with pytest.raises(ValueError, match="cannot place"):
            spread_positions(tokens, kept)
