"""The ``mmrag`` command line. Each sub-command is a module imported only when it runs.

A command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib

# name -> module; kept in one place so `mmrag --help` lists everything without importing heavy code.
COMMANDS: dict[str, str] = {
    "serve": "mmrag.serving.cli.serve",
    "models": "mmrag.serving.cli.models",
    "make-tiny-model": "mmrag.serving.cli.make_tiny_model",
    "bench": "mmrag.serving.cli.bench",
    "ingest": "mmrag.serving.cli.ingest",
    "collections": "mmrag.serving.cli.collections",
    "batch": "mmrag.serving.cli.batch",
    "train-tiny": "mmrag.serving.cli.train_tiny",
    "train-projector": "mmrag.serving.cli.train_projector",
    "train-smol-vision": "mmrag.serving.cli.train_smol_vision",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmrag", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_path in COMMANDS.items():
        module = importlib.import_module(module_path)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)
