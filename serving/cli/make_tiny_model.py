"""``mmrag make-tiny-model DIR``: write the deterministic random-weight LLaVA fixture."""

from __future__ import annotations

import argparse

HELP = "Write a tiny random-weight LLaVA checkpoint (same seed, identical files)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="DIR", help="Output directory (created if missing).")
    parser.add_argument("--seed", type=int, default=0, help="Weight seed (default 0).")


def run(args: argparse.Namespace) -> int:
    from mmrag.serving.models.tiny import TinyLlavaSpec, make_tiny_llava

    out = make_tiny_llava(args.out_dir, TinyLlavaSpec(seed=args.seed))
    print(f"wrote tiny LLaVA (seed {args.seed}) to {out}")
    return 0
