"""``mmrag ingest PATH...``: chunk, embed and upsert .txt/.md/.jsonl/.pdf/.html files (or folders) into Milvus.

Idempotent: content already stored is skipped. Uses the same configuration as ``mmrag serve``
(``--config``/``--set``); with Milvus Lite, stop the server first (one process per Lite file).
"""

from __future__ import annotations

import argparse
import sys

from mmrag.serving.cli.common import add_config_arguments, load_config

HELP = "Ingest .txt/.md/.jsonl/.pdf/.html files or folders into a Milvus collection."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="Files or folders (recursive).")
    parser.add_argument("--collection", default=None, help="Target collection (default retrieval.collection).")
    parser.add_argument("--chunk-tokens", type=int, default=None, help="Encoder tokens per chunk.")
    parser.add_argument("--overlap-tokens", type=int, default=None, help="Tokens shared by neighbours.")
    parser.add_argument("--batch-size", type=int, default=256, help="Chunks per embed + upsert batch.")
    parser.add_argument("--replace", action="store_true", help="First delete the stored chunks of every ingested file.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmrag.serving.retrieval.encoders import load_encoder
    from mmrag.serving.retrieval.errors import RetrievalError
    from mmrag.serving.retrieval.ingest import ingest_paths
    from mmrag.serving.retrieval.store import MilvusStore

    try:
        full_config = load_config(args)
        config = full_config.retrieval
        sizes = {"chunk_tokens": args.chunk_tokens, "overlap_tokens": args.overlap_tokens}
        sizes = {k: v for k, v in sizes.items() if v is not None}
        if sizes:
            config.chunking = type(config.chunking).model_validate(config.chunking.model_dump() | sizes)
        encoder = load_encoder(config.encoder)
        xrag_encoder = load_encoder(config.xrag_encoder) if config.xrag_encoder else None
        store = MilvusStore(config)
        try:
            summary = ingest_paths(
                args.paths,
                store,
                encoder,
                config,
                source_root=Path.cwd(),
                collection=args.collection,
                replace=args.replace,
                batch_size=args.batch_size,
                progress=not args.no_progress,
                xrag_encoder=xrag_encoder,
                parse_limits=full_config.files.parsing,
            )
        finally:
            store.close()
    except (RetrievalError, ValueError, FileNotFoundError) as exc:
        print(f"mmrag ingest: error: {exc}", file=sys.stderr)
        return 2
    print(summary.describe())
    return 0
