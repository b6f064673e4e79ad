"""``mmrag models list`` / ``mmrag models prepare NAME``: the registered models and their cached copies."""

from __future__ import annotations

import argparse

HELP = "List the registered models, or prepare one into the cache (no network)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="Each model's name, served name, modality and summary.")
    prepare = actions.add_parser("prepare", help="Prepare a model into the cache (and check a prepared copy).")
    prepare.add_argument("name", help="A registered model name (see `mmrag models list`).")
    prepare.add_argument("--seed", type=int, default=0, help="tiny-random only: the weight seed.")


def run(args: argparse.Namespace) -> int:
    from mmrag.serving.models.registry import MANIFEST, MODELS, prepare, verify
    from mmrag.serving.video import VIDEO_MODELS

    if args.action == "list":
        width = max(map(len, MODELS))
        for entry in MODELS.values():
            modality = "text" + "+image" * entry.multimodal + "+video" * (entry.name in VIDEO_MODELS)
            print(f"{entry.name:<{width}}  {entry.served_name:<16}  {modality:<16}  {entry.summary}")
        return 0
    if args.name not in MODELS:
        print(f"unknown model {args.name!r}; registered: {', '.join(MODELS)}")
        return 2
    path = prepare(args.name, args.seed)
    damaged = verify(path) if (path / MANIFEST).is_file() else []
    if damaged:
        print(f"{args.name}: {path} has files that differ from its manifest: {damaged}; delete the directory")
        return 1
    print(f"{args.name}: {path}")
    return 0
