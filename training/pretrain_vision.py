"""The vision tower's own pretraining: name the shape and the colour of single rendered images.

LLaVA starts from a CLIP tower pretrained on image-text pairs and keeps it frozen. No such weights can be
downloaded here, and trained from scratch through the language model's answer loss alone the tower learnt
colour but not shape: a linear probe on the earlier model's visual tokens reads colour at 1.00 and shape
at 0.51 (four shapes; chance 0.25). Classifying shape and colour from the mean of the patch tokens takes the
same tower to 0.99 / 1.00 in 1500 steps (about 30 s here). The classification head is thrown away; the
tower is then frozen, as in LLaVA, and the projector and the LM learn to read it.

On by default (``mmrag train-tiny --vision-pretrain-steps 1500``): the shipped model's tower was trained so.

Images are drawn from their own seeded stream (single images, no questions): nothing of the tasks' held-out
split is involved.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from mmrag.training.data import pixel_values
from mmrag.training.tasks.render import COLOURS, SHAPES, ShapeImage, render

__all__ = ["pretrain_vision"]


def _images(rng: random.Random, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels ``(count, 3, H, W)``, shape labels and colour labels."""
    colours = list(COLOURS)
    shapes = [rng.randrange(len(SHAPES)) for _ in range(count)]
    tints = [rng.randrange(len(colours)) for _ in range(count)]
    pixels = [render(ShapeImage(colours[c], SHAPES[s]), rng) for s, c in zip(shapes, tints, strict=True)]
    return pixel_values(pixels), torch.tensor(shapes), torch.tensor(tints)


def _pooled(tower: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Mean of the patch tokens (the CLS token dropped, as LLaVA's feature selection does)."""
    return tower(pixels).last_hidden_state[:, 1:].mean(dim=1)


def pretrain_vision(
    tower: nn.Module, *, steps: int, batch_size: int, lr: float, seed: int, progress: bool = True
) -> dict[str, float]:
    """Train ``tower`` in place (on the device it sits on) on shape + colour classification; returns held-out
    accuracies."""
    # Its own torch generator state: a run resumed after this stage (which it skips) continues with the
    # same global state as the uninterrupted run.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _pretrain(tower, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress)


def _pretrain(
    tower: nn.Module, *, steps: int, batch_size: int, lr: float, seed: int, progress: bool
) -> dict[str, float]:
    from tqdm import tqdm

    device = next(tower.parameters()).device
    head = nn.Linear(tower.config.hidden_size, len(SHAPES) + len(COLOURS), device=device)
    optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=lr)
    rng = random.Random(f"{seed}:vision-pretraining")
    heldout = [t.to(device) for t in _images(random.Random(f"{seed}:vision-heldout"), 512)]
    tower.train()
    for _ in tqdm(range(steps), disable=not progress, desc="vision"):
        pixels, shapes, colours = (t.to(device) for t in _images(rng, batch_size))
        logits = head(_pooled(tower, pixels))
        loss = nn.functional.cross_entropy(logits[:, : len(SHAPES)], shapes) + nn.functional.cross_entropy(
            logits[:, len(SHAPES) :], colours
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    tower.eval()
    with torch.no_grad():
        pixels, shapes, colours = heldout
        logits = head(_pooled(tower, pixels))
    return {
        "shape_accuracy": float((logits[:, : len(SHAPES)].argmax(1) == shapes).float().mean()),
        "colour_accuracy": float((logits[:, len(SHAPES) :].argmax(1) == colours).float().mean()),
    }
