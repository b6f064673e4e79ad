"""The tiny LLaVA, the tiny Qwen2.5-VL and seeded noise images, shared by the plugin tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def noise_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def tiny_llava_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmrag.serving.models.tiny import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


def noise_picture(seed: int, height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def tiny_qwen_vl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmrag.serving.models.tiny_qwen_vl import make_tiny_qwen_vl

    return make_tiny_qwen_vl(tmp_path_factory.mktemp("tiny-qwen-vl"))
