"""``mmrag train-projector [--out DIR] [--model PATH]``: train an xRAG projector for an (encoder, LLM) pair."""

from __future__ import annotations

import argparse

HELP = "Train the xRAG projector (paraphrase + self-distilled instruction stages; LLM and encoder frozen)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmrag.serving.cli.common import add_config_arguments
    from mmrag.training.train_projector import ProjectorTrainConfig

    defaults = ProjectorTrainConfig()
    parser.add_argument("--model", default=None, help="LLM checkpoint directory (default: the shipped trained model).")
    parser.add_argument("--out", default=None, help="Projector directory (default: the shipped projector's path).")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--paraphrase-steps", type=int, default=defaults.paraphrase_steps)
    parser.add_argument("--instruct-steps", type=int, default=defaults.instruct_steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--device", default="cpu", help="torch device for the LLM and projector (e.g. cuda).")
    parser.add_argument("--no-resume", action="store_true", help="Ignore a checkpoint left by an interrupted run.")
    # The encoder is the config's (retrieval.xrag_encoder, else retrieval.encoder): the one serving will use.
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from mmrag.serving.cli.common import load_config
    from mmrag.serving.models.trained import TRAINED_MODEL_DIR, TRAINED_PROJECTOR_DIR
    from mmrag.serving.retrieval.encoders import load_encoder
    from mmrag.training.train_projector import ProjectorTrainConfig, train_projector

    retrieval = load_config(args).retrieval
    encoder = load_encoder(retrieval.xrag_encoder or retrieval.encoder)
    config = ProjectorTrainConfig(
        seed=args.seed,
        paraphrase_steps=args.paraphrase_steps,
        instruct_steps=args.instruct_steps,
        batch_size=args.batch_size,
    )
    out = args.out or TRAINED_PROJECTOR_DIR
    summary = train_projector(
        out, args.model or TRAINED_MODEL_DIR, encoder, config, resume=not args.no_resume, device=args.device
    )
    accuracy = " ".join(f"{k} {v:.3f}" for k, v in (summary["heldout"] or {}).items())
    print(f"wrote {out} in {summary['train_seconds']:.0f} s; held-out knowledge exact match: {accuracy}")
    return 0
