"""``mmrag train-tiny [--out DIR]``: train the project's small MLLM on the generated tasks."""

from __future__ import annotations

import argparse

HELP = "Train the small LLaVA on generated multi-image and knowledge tasks (seeded, resumable; CPU or CUDA)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmrag.training.train_tiny import TrainConfig

    defaults = TrainConfig()
    parser.add_argument("--out", default=None, help="Checkpoint directory (default: the shipped model's path).")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--steps", type=int, default=defaults.steps, help=f"Optimizer steps (default {defaults.steps})."
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-images", type=int, default=defaults.max_images, help="Most images per prompt.")
    parser.add_argument(
        "--binding-fraction",
        type=float,
        default=defaults.binding_fraction,
        help="Fraction of the steps asking colour questions alone, within the hold (default "
        f"{defaults.binding_fraction}; binding 'Image k' is learnt there and wears off later, see the README).",
    )
    parser.add_argument(
        "--curriculum-hold",
        type=float,
        default=defaults.curriculum_hold,
        help="Fraction of the steps with at most two images per prompt, before the ramp to --max-images "
        f"(default {defaults.curriculum_hold}).",
    )
    parser.add_argument(
        "--curriculum-fraction",
        type=float,
        default=defaults.curriculum_fraction,
        help=f"Fraction of the steps by which prompts reach --max-images (default {defaults.curriculum_fraction}).",
    )
    parser.add_argument(
        "--family-weight",
        type=_family_weight,
        action="append",
        default=[],
        metavar="FAMILY=W",
        help="How often a family is drawn after the binding phase, relative to the others; repeatable (default "
        + ", ".join(f"{family}={weight:g}" for family, weight in defaults.family_weights.items())
        + ").",
    )
    parser.add_argument(
        "--no-prompt-loss",
        action="store_true",
        help="Train on the answers alone, not next-token prediction over the prompt's text too (see the README).",
    )
    parser.add_argument(
        "--vision-pretrain-steps",
        type=int,
        default=defaults.vision_pretrain_steps,
        help="Pretrain the vision tower on shape/colour classification for N steps, then freeze it "
        f"(default {defaults.vision_pretrain_steps}; 0: trained end to end, which never learnt shape; see the README).",
    )
    parser.add_argument(
        "--induction-pretrain-steps",
        type=int,
        default=defaults.induction_pretrain_steps,
        help="Warm the LM up for N steps on repeated runs of random tokens, for the induction heads reading a "
        f"document's value takes (default {defaults.induction_pretrain_steps}; docs/training-log.md).",
    )
    parser.add_argument(
        "--induction-aux-weight",
        type=float,
        default=defaults.induction_aux_weight,
        help="Weight of the repeated-run loss added to every training step "
        f"(default {defaults.induction_aux_weight:g}: none).",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default=defaults.precision,
        help="Autocast dtype (default auto: bf16 where the CPU has bf16 instructions, else fp32).",
    )
    parser.add_argument(
        "--device",
        default=defaults.device,
        help="cpu (default; how the shipped model was trained) or cuda[:N], for trying recipes at more steps.",
    )
    parser.add_argument(
        "--data-workers",
        type=int,
        default=defaults.data_workers,
        help="Processes building batches ahead of the training loop (default 0: in the loop; a GPU needs some).",
    )
    parser.add_argument("--no-resume", action="store_true", help="Ignore a checkpoint left by an interrupted run.")


def _family_weight(text: str) -> tuple[str, float]:
    from mmrag.training.tasks import FAMILIES

    family, _, weight = text.partition("=")
    if family not in FAMILIES:
        raise argparse.ArgumentTypeError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    try:
        value = float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the weight after '=' must be a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the weight must be >= 0")
    return family, value


def config_from_args(args: argparse.Namespace):
    from mmrag.training.train_tiny import TrainConfig

    return TrainConfig(
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        max_images=args.max_images,
        binding_fraction=args.binding_fraction,
        curriculum_hold=args.curriculum_hold,
        curriculum_fraction=args.curriculum_fraction,
        family_weights={**TrainConfig().family_weights, **dict(args.family_weight)},
        prompt_loss=not args.no_prompt_loss,
        vision_pretrain_steps=args.vision_pretrain_steps,
        induction_pretrain_steps=args.induction_pretrain_steps,
        induction_aux_weight=args.induction_aux_weight,
        precision=args.precision,
        device=args.device,
        data_workers=args.data_workers,
    )


def run(args: argparse.Namespace) -> int:
    from mmrag.serving.models.trained import TRAINED_MODEL_DIR
    from mmrag.training.train_tiny import train_tiny

    out = args.out or TRAINED_MODEL_DIR
    summary = train_tiny(out, config_from_args(args), resume=not args.no_resume)
    accuracy = " ".join(f"{k} {v:.3f}" for k, v in (summary["heldout"] or {}).items())
    print(f"wrote {out} in {summary['train_seconds']:.0f} s; held-out exact match: {accuracy}")
    for family, by_count in (summary["heldout_by_context"] or {}).items():
        what = "documents" if family == "knowledge" else "images"
        print(f"  {family} by number of {what}: " + " ".join(f"{n}: {v:.2f}" for n, v in by_count.items()))
    return 0
