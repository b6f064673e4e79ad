"""The naive eviction rules keep what they say, at the same entry count as LOOK-M's image budget."""

from __future__ import annotations

import pytest
import torch

from mmrag.kernels.kv_baselines import (
    image_keep_count,
    random_image_keep_indices,
    recent_keep_indices,
    score_keep_indices,
)
from mmrag.kernels.lookm import LookMBudget, text_prior_keep_indices


@pytest.mark.parametrize(
    ("n", "budget", "kept"), [(96, 0.1, 10), (96, 0.2, 20), (96, 0.4, 39), (16, 0.01, 1), (0, 0.5, 0)]
)
def test_image_keep_count_is_the_ceiling_and_at_least_one(n, budget, kept):
    assert image_keep_count(n, budget) == kept


def test_image_keep_count_rejects_a_budget_outside_0_1():
    with pytest.raises(ValueError, match="budget"):
        image_keep_count(10, 0.0)


def test_recent_keeps_the_tail():
    assert recent_keep_indices(2, 10, 3).tolist() == [[7, 8, 9], [7, 8, 9]]


def test_scores_keep_the_top_entries_text_unprotected():
    scores = torch.tensor([[0.1, 5.0, 0.2, 3.0, 0.3], [9.0, 0.0, 0.0, 0.0, 1.0]])
    assert score_keep_indices(scores, 2).tolist() == [[1, 3], [0, 4]]


def test_random_keeps_all_text_and_the_asked_number_of_images_per_head():
    is_image = torch.tensor([False, True, True, True, True, True, False, False])
    keep = random_image_keep_indices(is_image, 2, heads=3, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (3, 5)
    for row in keep:
        assert {0, 6, 7} <= set(row.tolist()) and int(is_image[row].sum()) == 2
        assert row.tolist() == sorted(row.tolist())
    again = random_image_keep_indices(is_image, 2, heads=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)


def test_lookm_with_an_image_budget_keeps_text_and_top_image_entries():
    """LookM(image_budget=b) is the text-prior rule with heavy = text + ceil(b * images) and no window."""
    is_image = torch.tensor([False] * 3 + [True] * 10 + [False] * 2)
    scores = torch.arange(15, dtype=torch.float32).flip(0)[None]  # earlier = higher
    kept_images = image_keep_count(10, 0.2)
    keep = text_prior_keep_indices(scores, is_image, LookMBudget(heavy=5 + kept_images, recent=0))
    assert keep.tolist() == [[0, 1, 2, 3, 4, 13, 14]]
