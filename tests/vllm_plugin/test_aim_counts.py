"""The kept-count rule and the merge schedule, without vLLM: a pure function of (tokens, ratio)."""

from __future__ import annotations

import pytest
import torch

from mmrag.kernels.token_merge import merged_token_count
from mmrag.serving.reference.methods import AIMMerge
from mmrag.serving.vllm_plugin.aim import aim_kept_tokens, aim_merge, check_keep_ratio, merge_schedule


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 16, 49, 196, 576, 729])
@pytest.mark.parametrize("passes", [0, 1, 2, 3])
def test_power_of_two_ratios_are_the_reference_passes(num_tokens: int, passes: int) -> None:
    ratio = 0.5**passes
    assert aim_kept_tokens(num_tokens, ratio) == merged_token_count(num_tokens, passes)
    assert merge_schedule(num_tokens, aim_kept_tokens(num_tokens, ratio)) == [
        r for r in _halvings(num_tokens, passes) if r
    ]


def _halvings(num_tokens: int, passes: int) -> list[int]:
    out = []
    for _ in range(passes):
        out.append(num_tokens // 2)
        num_tokens -= num_tokens // 2
    return out


@pytest.mark.parametrize(("num_tokens", "ratio", "kept"), [(16, 1.0, 16), (16, 0.3, 5), (16, 0.01, 1), (576, 0.1, 58)])
def test_kept_count_is_ceil_of_the_share(num_tokens: int, ratio: float, kept: int) -> None:
    assert aim_kept_tokens(num_tokens, ratio) == kept
    features = torch.randn(2, num_tokens, 8)
    assert aim_merge(features, ratio).shape == (2, kept, 8)


@pytest.mark.parametrize("passes", [1, 2])
def test_merge_equals_the_reference_engine_merge(passes: int) -> None:
    features = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(passes))
    expected = AIMMerge(num_passes=passes).apply(features).tokens
    torch.testing.assert_close(aim_merge(features, 0.5**passes), expected, rtol=0, atol=0)


def test_ratio_one_is_the_identity() -> None:
    features = torch.randn(1, 16, 4)
    assert aim_merge(features, 1.0) is features


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), "0.5", True, None])
def test_invalid_ratios_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="aim_keep_ratio"):
        check_keep_ratio(bad)  # type: ignore[arg-type]
