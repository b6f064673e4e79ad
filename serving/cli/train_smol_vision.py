"""``mmrag train-smol-vision``: train the projector between the vision tower and SmolLM2 (both frozen)."""

from __future__ import annotations

import argparse

HELP = "Train the smol MLLM's vision projector (LLaVA stages 1-2 with the LM and the tower frozen); resumable."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmrag.training.train_smol_vision import SmolVisionConfig

    defaults = SmolVisionConfig()
    parser.add_argument("--out", default=None, help="Output directory (default: the shipped serving/data/smol-vision).")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmrag.serving.models.smol import SMOL_VISION_DIR, locate_smol_lm
    from mmrag.serving.models.trained import TRAINED_MODEL_DIR
    from mmrag.training.train_smol_vision import SmolVisionConfig, train_smol_vision

    config = SmolVisionConfig(seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    out = Path(args.out) if args.out else SMOL_VISION_DIR
    summary = train_smol_vision(locate_smol_lm(), TRAINED_MODEL_DIR, out, config)
    print(f"wrote {out}: held-out exact match {summary['heldout']}")
    return 0
