"""The tiny random LLaVA, built once per session, and a two-image prompt for it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmrag.serving.models.tiny import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_llava(tiny_llava_dir: Path):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="session")
def peaky_llava(tiny_llava):
    """The tiny LLaVA with query and key weights scaled by 8: attention far from uniform.

    Random weights give near-uniform attention, where almost any importance rule ranks tokens by
    position alone; a test of which tokens a method keeps needs attention with something to rank.
    """
    model = copy.deepcopy(tiny_llava)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def tiny_processor(tiny_llava_dir: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_llava_dir)


def _image(seed: int):
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (56, 56, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="session")
def two_image_prompt(tiny_processor) -> dict[str, Any]:
    """``input_ids`` (1, 80: two runs of 16 image tokens) and ``pixel_values`` (2, 3, 56, 56)."""
    content = [
        {"type": "text", "text": "Compare "},
        {"type": "image"},
        {"type": "text", "text": " with "},
        {"type": "image"},
        {"type": "text", "text": ": which one is brighter?"},
    ]
    text = tiny_processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return dict(tiny_processor(text=text, images=[_image(1), _image(2)], return_tensors="pt"))


@pytest.fixture(scope="session")
def text_prompt(tiny_processor) -> dict[str, Any]:
    text = tiny_processor.apply_chat_template(
        [{"role": "user", "content": "Tell me about the sea."}], add_generation_prompt=True
    )
    return {"input_ids": tiny_processor(text=text, return_tensors="pt")["input_ids"]}
