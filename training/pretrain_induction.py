"""The language model's own warm-up: continue a run of random tokens that the context already holds.

Answering a knowledge question means finding the document about the asked entity and copying the value that
follows its name there: content-addressed copying, the job of induction heads. Trained on the tasks alone the
model never forms them and answers by kind instead (any document's colour: 1 / 2 / 3 documents give 1.00 /
0.45 / 0.33, numbers never). A run of random tokens repeated at a random offset forms them in about 800 steps
(two minutes here); half the runs use an alphabet of 8 tokens, where one token does not tell where to copy
from and the match must span the tokens before it. Knowledge alone, 1000 steps, after this warm-up (and with
the auxiliary loss below): held-out 0.54 against 0.44 without, numbers answered for the first time (47 / 82
against 0 / 82); with answers restated as the documents' sentence, 0.59 against 0.11 (docs/training-log.md,
"An induction warm-up").

``induction_batch`` also serves the optional auxiliary loss during training (``induction_aux_weight``), meant
to keep the heads from being trained away (not measured without it). Sequences are drawn from their own
seeded stream; no task text is involved.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from mmrag.training.data import IGNORE

__all__ = ["induction_batch", "induction_loss", "pretrain_induction"]

SEQUENCE_LENGTH = 96
_RUN_LENGTHS = (12, 40)  # a random offset between the two copies: no fixed-distance head solves it
_SMALL_ALPHABET = 8


def induction_batch(rng: random.Random, count: int, token_ids: range) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``, each ``(count, SEQUENCE_LENGTH)``: a run, the same run, random filler; labels on
    the second run only. Even rows draw from ``token_ids`` (the tokenizer's ordinary tokens: no image token,
    which would ask for pixels), odd rows from its first 8."""
    ids, labels = [], []
    for row in range(count):
        alphabet = token_ids[:_SMALL_ALPHABET] if row % 2 else token_ids
        length = rng.randint(*_RUN_LENGTHS)
        run = [rng.choice(alphabet) for _ in range(length)]
        filler = [rng.choice(alphabet) for _ in range(SEQUENCE_LENGTH - 2 * length)]
        ids.append(run + run + filler)
        # Position length + i predicts run[i + 1]; labels are shifted in the loss, as for the tasks.
        labels.append([IGNORE] * (length + 1) + run[1:] + [IGNORE] * len(filler))
    return torch.tensor(ids), torch.tensor(labels)


def induction_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss on the repeated run (text only: the tower and the projector get no gradient)."""
    logits = model(input_ids=input_ids).logits
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE
    )


def repeat_accuracy(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Next-token accuracy on the repeated runs, whole vocabulary and small alphabet apart."""
    with torch.no_grad():
        predicted = model(input_ids=input_ids).logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    hit, scored = predicted == target, target != IGNORE
    return {
        "repeat_accuracy": float(hit[0::2][scored[0::2]].float().mean()),
        "repeat_accuracy_small_alphabet": float(hit[1::2][scored[1::2]].float().mean()),
    }


def pretrain_induction(
    model: nn.Module,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    token_ids: range,
    autocast=None,
    progress: bool = True,
) -> dict[str, float]:
    """Train ``model``'s language model in place on repeated runs; returns accuracies on 128 held-out runs.

    ``autocast``: a context-manager factory for the forward passes (the training's precision)."""
    from contextlib import nullcontext

    from tqdm import tqdm

    autocast = autocast or nullcontext
    device = next(model.parameters()).device
    # Its own generator state, as the tower's pretraining: a run resumed after this stage (which it skips)
    # continues with the same global state as the uninterrupted run.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        rng = random.Random(f"{seed}:induction-pretraining")
        for _ in tqdm(range(steps), disable=not progress, desc="induction"):
            ids, labels = (t.to(device) for t in induction_batch(rng, batch_size, token_ids))
            with autocast():
                loss = induction_loss(model, ids, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        heldout = [t.to(device) for t in induction_batch(random.Random(f"{seed}:induction-heldout"), 128, token_ids)]
        with autocast():
            return repeat_accuracy(model, *heldout)
