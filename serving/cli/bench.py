"""``mmrag bench NAME [--quick] [--out FILE]``: run one benchmark from ``benchmarks/``.

A benchmark module defines ``HELP``, ``add_arguments(parser)`` (optional) and ``run(args) -> int``; it
writes ``benchmarks/results/NAME.json`` (or ``--out``) and a plot beside it.
"""

from __future__ import annotations

import argparse
import importlib

HELP = "Run a benchmark (JSON + plot in benchmarks/results/)."

BENCHMARKS: dict[str, str] = {
    "retrieval": "mmrag.benchmarks.retrieval",
    "lookm-scores": "mmrag.benchmarks.lookm_scores",
    "fidelity": "mmrag.benchmarks.fidelity",
    "autoscaling": "mmrag.benchmarks.autoscaling",
    "batch": "mmrag.benchmarks.batch",
    "load": "mmrag.benchmarks.load",
    "compression": "mmrag.benchmarks.compression",
    "accuracy": "mmrag.benchmarks.accuracy",
    "xrag": "mmrag.benchmarks.xrag",
    "serving": "mmrag.benchmarks.serving",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="NAME", required=True)
    for name, module_path in BENCHMARKS.items():
        module = importlib.import_module(module_path)
        add_benchmark_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP), module)


def add_benchmark_arguments(parser: argparse.ArgumentParser, module) -> None:
    parser.add_argument("--quick", action="store_true", help="Small sizes; finishes in minutes.")
    parser.add_argument("--out", default=None, help="Result JSON path (default benchmarks/results/).")
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    parser.set_defaults(_bench=module.run)


def parse_benchmark_args(name: str, argv: list[str]) -> argparse.Namespace:
    """The arguments ``mmrag bench NAME ARGV...`` would get (smoke tests call a benchmark this way)."""
    parser = argparse.ArgumentParser(prog=f"mmrag bench {name}")
    add_benchmark_arguments(parser, importlib.import_module(BENCHMARKS[name]))
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    return int(args._bench(args) or 0)
