"""``mmrag train-projector [--model NAME|PATH] [--out DIR]``: train an xRAG projector for an (encoder, LLM) pair."""

from __future__ import annotations

import argparse

HELP = "Train the xRAG projector (paraphrase + self-distilled instruction stages; LLM and encoder frozen)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmrag.serving.cli.common import add_config_arguments

    parser.add_argument(
        "--model",
        default="tiny-mllm",
        help="A registered model with training settings (tiny-mllm, smol, tiny-qwen2.5-vl, tiny-llava-onevision) or "
        "a checkpoint directory (trained with tiny-mllm's settings). Default: tiny-mllm.",
    )
    parser.add_argument("--out", default=None, help="Projector directory (default: the model's shipped projector).")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--paraphrase-steps", type=int, default=None, help="Default: the model's preset.")
    parser.add_argument("--instruct-steps", type=int, default=None, help="Default: the model's preset.")
    parser.add_argument("--batch-size", type=int, default=None, help="Default: the model's preset.")
    parser.add_argument("--device", default="cpu", help="torch device for the LLM and projector (e.g. cuda).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--no-resume", action="store_true", help="Ignore a checkpoint left by an interrupted run.")
    # The encoder is the config's (retrieval.xrag_encoder, else retrieval.encoder): the one serving will use.
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import logging
    from pathlib import Path

    from mmrag.serving.cli.common import load_config
    from mmrag.serving.models.registry import MODELS, prepare
    from mmrag.serving.retrieval.encoders import load_encoder
    from mmrag.training.train_projector import PRESETS, shipped_projector_dir, train_projector

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    retrieval = load_config(args).retrieval
    encoder = load_encoder(retrieval.xrag_encoder or retrieval.encoder)
    registered = args.model in MODELS
    if not registered and not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"--model {args.model!r}: not a registered model ({', '.join(MODELS)}) nor a checkpoint")
    config = PRESETS.get(args.model, PRESETS["tiny-mllm"])
    overrides = {
        "seed": args.seed,
        "paraphrase_steps": args.paraphrase_steps,
        "instruct_steps": args.instruct_steps,
        "batch_size": args.batch_size,
    }
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    out = args.out or shipped_projector_dir(args.model)
    if out is None:
        raise SystemExit(f"--model {args.model!r} has no shipped projector directory: give --out")
    model_path = prepare(args.model) if registered else Path(args.model)
    summary = train_projector(
        out, model_path, encoder, config, resume=not args.no_resume, device=args.device, threads=args.threads
    )
    accuracy = " ".join(f"{k} {v:.3f}" for k, v in (summary["heldout"] or {}).items())
    print(f"wrote {out} in {summary['train_seconds']:.0f} s; held-out exact match (teacher-forced): {accuracy}")
    return 0
