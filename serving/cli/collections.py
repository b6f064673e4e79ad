"""``mmrag collections list|stats|delete-source|drop``: look at and manage Milvus collections."""

from __future__ import annotations

import argparse
import sys

from mmrag.serving.cli.common import add_config_arguments, load_config

HELP = "List, inspect and manage Milvus collections (stats, delete a source, drop)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add_config_arguments(sub.add_parser("list", help="Collections with their chunk count and encoder."))
    stats = sub.add_parser("stats", help="Chunks, encoder, index and chunks per source of one collection.")
    stats.add_argument("name")
    stats.add_argument("--sources", type=int, default=20, help="Sources shown (most chunks first).")
    add_config_arguments(stats)
    delete = sub.add_parser("delete-source", help="Delete every chunk of one source (a file path).")
    delete.add_argument("name")
    delete.add_argument("source")
    add_config_arguments(delete)
    drop = sub.add_parser("drop", help="Delete a collection and all its chunks.")
    drop.add_argument("name")
    drop.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")
    add_config_arguments(drop)


def run(args: argparse.Namespace) -> int:
    from mmrag.serving.retrieval.errors import RetrievalError
    from mmrag.serving.retrieval.store import MilvusStore

    try:
        store = MilvusStore(load_config(args).retrieval)
        try:
            return ACTIONS[args.action](store, args)
        finally:
            store.close()
    except (RetrievalError, ValueError) as exc:
        print(f"mmrag collections: error: {exc}", file=sys.stderr)
        return 2


def _list(store, args: argparse.Namespace) -> int:
    for name in store.list_collections():
        props = store.properties(name)
        encoder = props.get("mmrag.encoder", "(not an mmrag collection)")
        print(f"{name}\t{store.count(name)} chunks\t{encoder}")
    return 0


def _stats(store, args: argparse.Namespace) -> int:
    props = store.properties(args.name)
    sources = store.source_counts(args.name)
    print(f"collection: {args.name}")
    print(f"chunks: {sum(sources.values())}")
    print(f"sources: {len(sources)}")
    print(f"encoder: {props.get('mmrag.encoder')} ({props.get('mmrag.encoder_dim')}-d)")
    if "mmrag.xrag_encoder" in props:
        print(f"xrag encoder: {props['mmrag.xrag_encoder']} ({props.get('mmrag.xrag_dim')}-d)")
    for source, count in sources.most_common(args.sources):
        print(f"  {count:8d}  {source}")
    return 0


def _delete_source(store, args: argparse.Namespace) -> int:
    deleted = store.delete_source(args.name, args.source)
    print(f"deleted {deleted} chunks of {args.source!r} from {args.name}")
    return 0


def _drop(store, args: argparse.Namespace) -> int:
    if not args.yes:
        answer = input(f"drop collection {args.name!r} and all its chunks? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not dropped")
            return 1
    store.drop(args.name)
    print(f"dropped {args.name}")
    return 0


ACTIONS = {"list": _list, "stats": _stats, "delete-source": _delete_source, "drop": _drop}
