"""The kept-count rule and the merge schedule, without vLLM: a pure function of (tokens, ratio)."""

from __future__ import annotations

import pytest
import torch

from mmrag.kernels.methods.aim import AIMMerge
from mmrag.kernels.token_merge import merged_token_count, spread_positions
from mmrag.serving.vllm_plugin.aim import (
    aim_kept_tokens,
    aim_merge,
    check_keep_ratio,
    merge_schedule,
    prompt_positions,
    rope_overrides,
)


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


def test_prompt_positions_without_merge_are_consecutive() -> None:
    assert prompt_positions(6, []) == (list(range(6)), 0)
    assert prompt_positions(20, [(2, 16, 16)]) == (list(range(20)), 0)


def test_prompt_positions_keep_each_images_span() -> None:
    # text 0-1, image A (16 -> 4) at 2, text, image B (16 -> 8) at 7, text to the end
    positions, delta = prompt_positions(17, [(7, 8, 16), (2, 4, 16)])  # any order of images
    assert positions[:2] == [0, 1]
    assert positions[2:6] == [2 + p for p in spread_positions(16, 4)]
    assert positions[6] == 18  # the text after image A where it was before the merge
    assert positions[7:15] == [19 + p for p in spread_positions(16, 8)]
    assert positions[15:] == [35, 36]
    assert delta == (16 - 4) + (16 - 8) == 37 - 17


def test_prompt_positions_match_the_reference_engine(tiny_llava_path) -> None:
    """The vLLM-side layout is the reference engine's, token for token."""
    from mmrag.kernels.reference.engine import ReferenceEngine, ReferenceMethods

    engine = ReferenceEngine.from_pretrained(tiny_llava_path)
    engine = ReferenceEngine(engine.model, ReferenceMethods(merge=AIMMerge(num_passes=2, positions="spread")))
    image = engine.image_token_id
    ids = torch.tensor([[1, 5, *[image] * 16, 6, 7, *[image] * 16, 8]])
    _, _, positions = engine._embed_prompt(ids, torch.zeros(2, 3, 56, 56))
    expected, delta = prompt_positions(2 + 4 + 2 + 4 + 1, [(2, 4, 16), (8, 4, 16)])
    assert positions.tolist() == expected
    assert int(positions[-1]) + 1 == ids.shape[1] == len(expected) + delta


def test_rope_overrides_put_plain_rope_on_three_equal_sections() -> None:
    overrides = rope_overrides({"head_dim": 64, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    rope = overrides["text_config"]["rope_parameters"]
    assert rope["rope_theta"] == 1e4 and sum(rope["mrope_section"]) == 32 and len(rope["mrope_section"]) == 3
    legacy = rope_overrides({"hidden_size": 4096, "num_attention_heads": 32, "rope_theta": 5e5})
    assert legacy["text_config"]["rope_parameters"]["rope_theta"] == 5e5
    assert sum(legacy["text_config"]["rope_parameters"]["mrope_section"]) == 64
    with pytest.raises(ValueError, match="plain RoPE"):
        rope_overrides({"head_dim": 64, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}})
