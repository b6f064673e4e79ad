"""Procedural images: one coloured shape on a noisy dark background, drawn with numpy (no fonts, no files).

The palette and shapes are chosen to be separable at 32x32 with 8x8 patches: a shape spans 2-3 patches, so
an image's answer lives in a few of its visual tokens, which is what makes KV eviction matter.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

__all__ = ["COLOURS", "SHAPES", "ShapeImage", "render"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 235),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "cross")


@dataclass(frozen=True)
class ShapeImage:
    """What an image shows; the pixels are drawn from it and a seed."""

    colour: str
    shape: str


def _mask(shape: str, size: int) -> np.ndarray:
    """``(size, size)`` bool footprint of ``shape``."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c = size / 2
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= c**2
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "triangle":  # apex up: the row's half-width grows linearly towards the base
        return np.abs(xx - c) <= yy / 2
    if shape == "cross":
        bar = size / 6
        return (np.abs(xx - c) <= bar) | (np.abs(yy - c) <= bar)
    raise ValueError(f"unknown shape {shape!r}")


def render(image: ShapeImage, rng: random.Random, size: int = 32) -> np.ndarray:
    """``(size, size, 3)`` uint8: the shape at a random place and scale, colours jittered a little."""
    noise = np.random.default_rng(rng.getrandbits(32))
    base = rng.randint(20, 60)
    pixels = noise.integers(base - 12, base + 12, size=(size, size, 3)).astype(np.int16)
    extent = rng.randint(size * 3 // 8, size * 5 // 8)
    top, left = rng.randint(0, size - extent), rng.randint(0, size - extent)
    jitter = noise.integers(-15, 16, size=3)
    colour = np.clip(np.array(COLOURS[image.colour]) + jitter, 0, 255)
    region = pixels[top : top + extent, left : left + extent]
    region[_mask(image.shape, extent)] = colour
    return pixels.clip(0, 255).astype(np.uint8)
