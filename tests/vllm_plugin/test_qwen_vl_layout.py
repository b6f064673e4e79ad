"""AIM on Qwen2.5-VL without vLLM: the merged tokens' order and M-RoPE positions, the reference, the wiring.

- at full count both layouts are transformers' own ``get_rope_index`` positions (text, several images of
  different shapes, a video's frames);
- ``spread`` keeps each image's extent (the text after keeps its positions), ``contiguous`` shrinks it to
  the smaller grid the merged tokens fill;
- the reading-order merge is AIM's merge, reordered by each token's first source;
- the reference with no method decodes as transformers' ``generate``;
- ``mmrag models`` names the checkpoint, and the engine arguments put it on the plugin's class.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmrag.serving.vllm_plugin.aim import (
    aim_overrides,
    merge_in_reading_order,
    merge_to_count,
    mrope_image_positions,
    mrope_prompt_positions,
)
from tests.vllm_plugin.conftest import noise_picture

IMAGE = 5  # <|image_pad|> in the tiny Qwen2.5-VL's vocabulary
SIZES = [(112, 112), (112, 168), (56, 56)]


def _items(ids: list[int], grids: list[list[int]], layout: str, token: int = IMAGE) -> list[tuple]:
    """``mrope_prompt_positions`` items of a prompt: each run of placeholders and its merged grid."""
    items, start = [], 0
    for frames, height, width in grids:
        offset = ids.index(token, start)
        end = offset
        while end < len(ids) and ids[end] == token:
            end += 1
        items.append((offset, (frames, height // 2, width // 2), (end - offset) // frames, 1.0, layout))
        start = end
    return items


@pytest.fixture(scope="module")
def hf(tiny_qwen_vl_path):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_qwen_vl_path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen_vl_path, dtype=torch.float32)
    return processor, model.eval()


def _inputs(processor, sizes=SIZES, text="what are they?"):
    images = [noise_picture(i, h, w) for i, (h, w) in enumerate(sizes)]
    content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(text=[prompt], images=images or None, return_tensors="pt")


@pytest.mark.slow  # generates the tiny checkpoint (about 8 s once) or loads it
@pytest.mark.parametrize("layout", ["contiguous", "spread"])
def test_full_count_is_transformers_rope_index(hf, layout: str) -> None:
    processor, model = hf
    inputs = _inputs(processor)
    ids = inputs["input_ids"][0].tolist()
    expected, delta = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    positions, shift = mrope_prompt_positions(len(ids), _items(ids, inputs["image_grid_thw"].tolist(), layout))
    assert torch.equal(positions, expected[:, 0])
    assert shift == int(delta)


@pytest.mark.slow  # generates the tiny checkpoint (about 8 s once) or loads it
def test_video_frames_keep_their_temporal_positions(hf) -> None:
    """A 4-frame video (2 temporal patches): each frame merged on its own, at Qwen's temporal position."""
    import numpy as np

    processor, model = hf
    video = np.random.default_rng(0).integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
    prompt = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>what?<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(text=[prompt], videos=[video], return_tensors="pt", do_sample_frames=False)
    ids = inputs["input_ids"][0].tolist()
    grids = inputs["video_grid_thw"].tolist()
    expected, _ = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs.get("second_per_grid_ts"),
    )
    t_factor = float(inputs["second_per_grid_ts"][0]) * model.config.vision_config.tokens_per_second
    (item,) = _items(ids, grids, "spread", token=6)
    positions, _ = mrope_prompt_positions(len(ids), [(*item[:3], t_factor, "spread")])
    assert torch.equal(positions, expected[:, 0])
    # Merged to 3 of 6 tokens per frame: every frame keeps its temporal position.
    frame_positions, _ = mrope_image_positions(tuple(item[1]), 3, "spread", t_factor)
    full, _ = mrope_image_positions(tuple(item[1]), 6, "spread", t_factor)
    assert frame_positions[0].unique().tolist() == full[0].unique().tolist()


def test_spread_keeps_the_extent_contiguous_shrinks_it() -> None:
    grid = (1, 4, 6)
    _, extent = mrope_image_positions(grid, 24)
    for kept in (12, 6, 3, 1):
        spread, spread_extent = mrope_image_positions(grid, kept, "spread")
        contiguous, contiguous_extent = mrope_image_positions(grid, kept, "contiguous")
        assert spread_extent == extent == 6
        rows, cols = math.ceil(kept / math.ceil(6 * math.sqrt(kept / 24))), math.ceil(6 * math.sqrt(kept / 24))
        assert contiguous_extent == max(rows, cols) <= extent
        for positions in (spread, contiguous):
            cells = {tuple(c) for c in positions[1:].T.tolist()}
            assert len(cells) == kept  # distinct cells of the image's own grid
            assert positions[1].max() < 4 and positions[2].max() < 6
    # The text after an image moves closer with contiguous positions, keeps its place with spread ones.
    items = [(3, grid, 6, 1.0, "spread")]
    spread, spread_shift = mrope_prompt_positions(3 + 6 + 5, items)
    contiguous, contiguous_shift = mrope_prompt_positions(3 + 6 + 5, [(*items[0][:4], "contiguous")])
    assert spread[:, -5:].tolist() == [list(range(9, 14))] * 3  # 3 text + extent 6, as unmerged
    assert contiguous_shift < spread_shift


def test_reading_order_merge_is_aims_merge_reordered() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 24, 16)
    for kept in (12, 6, 5, 1):
        ordered, plain = merge_in_reading_order(x, kept), merge_to_count(x, kept)
        assert ordered.shape == plain.shape == (3, kept, 16)
        for frame in range(3):  # the same tokens, in another order
            assert sorted(map(tuple, ordered[frame].tolist())) == sorted(map(tuple, plain[frame].tolist()))
    assert merge_in_reading_order(x, 24) is x


@pytest.mark.slow  # generates the tiny checkpoint (about 8 s once) or loads it
def test_reference_without_methods_is_transformers_generate(hf, tiny_qwen_vl_path) -> None:
    """Its own model (the reference switches its model's attention to a capturing one), against ``generate``
    on the stock model."""
    from mmrag.kernels.reference.qwen_vl import QwenReference

    processor, model = hf
    reference = QwenReference.from_pretrained(tiny_qwen_vl_path)
    for sizes in (SIZES, []):
        inputs = _inputs(processor, sizes)
        pixels = (inputs["pixel_values"], inputs["image_grid_thw"]) if sizes else (None, None)
        out = reference.generate(inputs["input_ids"][0], *pixels, max_new_tokens=6)
        expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert out.token_ids == expected[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.slow  # generates the tiny checkpoint (about 8 s once) or loads it
def test_registered_and_served_by_the_plugin(tiny_qwen_vl_path) -> None:
    from mmrag.serving.config import MmragConfig
    from mmrag.serving.engine.args import aim_enabled
    from mmrag.serving.models.registry import MODELS

    assert MODELS["tiny-qwen2.5-vl"].multimodal
    config = json.loads((tiny_qwen_vl_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["text_config"]["rope_parameters"]["mrope_section"] == [16, 8, 8]
    assert aim_enabled(MmragConfig.model_validate({"compression": {"aim_keep_ratio": 0.5}}), str(tiny_qwen_vl_path))
    assert aim_overrides(tiny_qwen_vl_path, 0.5, "spread") == {
        "architectures": ["AimQwen2_5_VLForConditionalGeneration"],
        "aim_keep_ratio": 0.5,
        "aim_positions": "spread",
    }


@pytest.mark.slow  # generates the tiny checkpoint (about 8 s once) or loads it
def test_checkpoint_is_a_pure_function_of_the_seed(tmp_path, tiny_qwen_vl_path) -> None:
    from mmrag.serving.models.tiny_qwen_vl import make_tiny_qwen_vl

    again = make_tiny_qwen_vl(tmp_path / "again")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_qwen_vl_path / name).read_bytes()


@pytest.mark.slow  # generates the tiny checkpoint (about 8 s once) or loads it
@pytest.mark.parametrize("layout", ["contiguous", "spread"])
def test_reference_positions_are_the_plugins_with_a_video(hf, tiny_qwen_vl_path, layout: str) -> None:
    """An image and a 4-frame video at 2 frames a second merged to 1/4: the reference's positions (from
    transformers' ``get_rope_index``, text continued past the largest position) equal the plugin's. At
    contiguous 1/4 the video's temporal positions (0, 2) pass its 1x2 grid: transformers 5.19 alone would
    start the text after it one position early."""
    import numpy as np
    from transformers.video_utils import VideoMetadata

    from mmrag.kernels.reference.qwen_vl import QwenReference

    processor, _ = hf
    video = np.random.default_rng(4).integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
    prompt = (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
        "the picture, then the clip<|im_end|>\n<|im_start|>assistant\n"
    )
    metadata = VideoMetadata(total_num_frames=4, fps=2.0, frames_indices=[0, 1, 2, 3], duration=2.0)
    inputs = processor(
        text=[prompt],
        images=[noise_picture(0, 56, 112)],
        videos=[video],
        video_metadata=[metadata],
        do_sample_frames=False,
        return_tensors="pt",
    )
    reference = QwenReference.from_pretrained(tiny_qwen_vl_path, merge_passes=2, layout=layout)
    ids, positions = reference._layout(
        inputs["input_ids"][0], inputs["image_grid_thw"], inputs["video_grid_thw"], inputs["second_per_grid_ts"]
    )
    t_factor = float(inputs["second_per_grid_ts"][0]) * 2  # tokens_per_second of the tiny model
    items = [
        (ids.tolist().index(IMAGE), (1, 2, 4), 2, 1.0, layout),  # 8 tokens -> 2
        (ids.tolist().index(6), (2, 2, 3), 2, t_factor, layout),  # 2 frames of 6 -> 2 each
    ]
    expected, _ = mrope_prompt_positions(len(ids), items)
    assert torch.equal(positions, expected)
