"""LOOK-M: text-prior selection and the three merge strategies, against loops written from the rules."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmrag.kernels.lookm import LookMBudget, evicted_indices, merge_evicted, text_prior_keep_indices

FAST = settings(max_examples=50, deadline=None, database=None)


def _case(seed: int, heads: int, seq_len: int, image_share: float):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(heads, seq_len, generator=gen)
    is_image = torch.rand(seq_len, generator=gen) < image_share
    return scores, is_image


@FAST
@given(
    seed=st.integers(0, 2**16),
    heads=st.integers(1, 4),
    seq_len=st.integers(1, 60),
    image_share=st.floats(0, 1),
    heavy=st.integers(0, 30),
    recent=st.integers(0, 20),
)
def test_selection_rules(seed: int, heads: int, seq_len: int, image_share: float, heavy: int, recent: int) -> None:
    scores, is_image = _case(seed, heads, seq_len, image_share)
    budget = LookMBudget(heavy, recent)
    keep = text_prior_keep_indices(scores, is_image, budget)
    split = seq_len - recent
    text_outside = int((~is_image[: max(split, 0)]).sum())
    assert keep.shape == (heads, budget.kept_count(seq_len, text_outside)), "same count in every head"
    for h in range(heads):
        kept = keep[h].tolist()
        assert kept == sorted(set(kept)), "ascending, no duplicates"
        if seq_len <= heavy + recent:
            assert kept == list(range(seq_len))
            continue
        kept_set = set(kept)
        assert all(j in kept_set for j in range(seq_len) if not is_image[j]), "text is always kept"
        assert all(j in kept_set for j in range(split, seq_len)), "the recent window is kept"
        # Images outside the window: exactly the best ones by score, as many as the heavy budget leaves.
        images = [j for j in range(split) if is_image[j]]
        budget_left = max(0, heavy - text_outside)
        best = sorted(images, key=lambda j: (-float(scores[h, j]), j))[:budget_left]
        assert sorted(j for j in kept if j < split and is_image[j]) == sorted(best)


def test_budget_from_ratios_and_defaults() -> None:
    assert LookMBudget.from_ratios(1000) == LookMBudget(100, 100)
    assert LookMBudget.from_ratios(57, 0.1, 0.2) == LookMBudget(5, 11)
    assert LookMBudget(5, 11).kept_count(57, 3) == 16
    assert LookMBudget(5, 11).kept_count(57, 9) == 20
    assert LookMBudget(5, 11).kept_count(16, 3) == 16


def test_selection_in_bf16_ranks_images_by_score() -> None:
    # bf16 scores near each other: the published "score - 65516" trick would tie them all.
    scores = torch.tensor([[0.5, 0.101, 0.125, 0.109, 0.117, 0.3, 0.2]], dtype=torch.bfloat16)
    is_image = torch.tensor([False, True, True, True, True, False, False])
    keep = text_prior_keep_indices(scores, is_image, LookMBudget(heavy=4, recent=1))
    assert keep.tolist() == [[0, 2, 4, 5, 6]]


def _naive_merge(
    keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, strategy: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, per evicted entry, with Python lists: the rules of the module docstring."""
    heads, seq_len, _ = keys.shape
    evicted = [[j for j in range(seq_len) if j not in set(keep[h].tolist())] for h in range(heads)]
    best: list[list[tuple[int, float]]] = []
    for h in range(heads):
        row = []
        for e in evicted[h]:
            sims = [
                float(torch.nn.functional.cosine_similarity(keys[h, e], keys[h, k], dim=0)) for k in keep[h].tolist()
            ]
            slot = max(range(len(sims)), key=lambda i: (sims[i], -i))
            row.append((slot, sims[slot]))
        best.append(row)
    passes = None
    if strategy in ("averaged", "weighted") and evicted[0]:
        slots = len(evicted[0])
        overall = sum(s for row in best for _, s in row) / (heads * slots)
        passes = [sum(best[h][i][1] for h in range(heads)) / heads >= overall for i in range(slots)]
    out_k, out_v = [], []
    for h in range(heads):
        kept = keep[h].tolist()
        groups_k = [[keys[h, k]] for k in kept]
        groups_v = [[values[h, k]] for k in kept]
        for i, e in enumerate(evicted[h]):
            slot, sim = best[h][i]
            if strategy is None or (passes is not None and not passes[i]):
                continue
            if strategy == "pivotal":
                groups_k[slot].append((keys[h, e] + keys[h, kept[slot]]) / 2)
                groups_v[slot].append((values[h, e] + values[h, kept[slot]]) / 2)
            else:
                weight = sim if strategy == "weighted" else 1.0
                groups_k[slot].append(weight * keys[h, e])
                groups_v[slot].append(weight * values[h, e])
        out_k.append(torch.stack([torch.stack(g).mean(0) for g in groups_k]))
        out_v.append(torch.stack([torch.stack(g).mean(0) for g in groups_v]))
    return torch.stack(out_k), torch.stack(out_v)


@FAST
@given(
    seed=st.integers(0, 2**16),
    heads=st.integers(1, 3),
    seq_len=st.integers(2, 24),
    strategy=st.sampled_from(["pivotal", "averaged", "weighted", None]),
)
def test_merge_matches_naive(seed: int, heads: int, seq_len: int, strategy: str | None) -> None:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(heads, seq_len, 8, generator=gen)
    values = torch.randn(heads, seq_len, 8, generator=gen)
    num_keep = 1 + seq_len // 3
    keep = torch.stack([torch.randperm(seq_len, generator=gen)[:num_keep].sort().values for _ in range(heads)])
    got_k, got_v = merge_evicted(keys, values, keep, strategy)
    want_k, want_v = _naive_merge(keys, values, keep, strategy)
    assert got_k.shape == (heads, num_keep, 8)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_v, want_v, rtol=1e-5, atol=1e-6)


@given(seed=st.integers(0, 2**16), strategy=st.sampled_from(["pivotal", "averaged", "weighted", None]))
@settings(max_examples=10, deadline=None, database=None)
def test_nothing_evicted_is_identity(seed: int, strategy: str | None) -> None:
    keys = torch.randn(2, 7, 4, generator=torch.Generator().manual_seed(seed))
    keep = torch.arange(7).expand(2, -1)
    got_k, got_v = merge_evicted(keys, -keys, keep, strategy)
    assert torch.equal(got_k, keys) and torch.equal(got_v, -keys)


def test_pivotal_by_hand() -> None:
    # One head, kept {0, 2}, evicted {1, 3}; both evicted keys point like kept key 2.
    keys = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [0.0, 1.0], [0.1, 3.0]]])
    values = torch.tensor([[[10.0], [20.0], [30.0], [40.0]]])
    got_k, got_v = merge_evicted(keys, values, torch.tensor([[0, 2]]), "pivotal")
    assert torch.equal(got_k[0, 0], keys[0, 0]) and torch.equal(got_v[0, 0], values[0, 0])
    pivots_v = [(20.0 + 30.0) / 2, (40.0 + 30.0) / 2]
    assert got_v[0, 1].item() == (30.0 + sum(pivots_v)) / 3
    torch.testing.assert_close(
        got_k[0, 1], (keys[0, 2] + (keys[0, 1] + keys[0, 2]) / 2 + (keys[0, 3] + keys[0, 2]) / 2) / 3
    )


def test_evicted_indices_complement() -> None:
    keep = torch.tensor([[0, 3, 4], [1, 2, 4]])
    assert evicted_indices(keep, 6).tolist() == [[1, 2, 5], [0, 3, 5]]
