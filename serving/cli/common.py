"""Arguments every command that reads the mmrag config shares: ``--config FILE`` and ``--set KEY=VALUE``."""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (default: the embedded defaults).")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override one config field by dotted path, e.g. --set engine.max_model_len=4096 (repeatable).",
    )


def load_config(args: argparse.Namespace, extra_overrides: list[str] | None = None):
    """The validated config from ``--config`` and ``--set`` (then ``extra_overrides``, which win)."""
    from mmrag.serving.config import MmragConfig

    return MmragConfig.from_file(args.config, [*args.overrides, *(extra_overrides or [])])
