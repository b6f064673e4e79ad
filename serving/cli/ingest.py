"""``mmrag ingest PATH...``: chunk, embed and upsert .txt/.md/.jsonl/.pdf/.html files (or folders) into Milvus.

Idempotent: content already stored is skipped. Uses the same configuration as ``mmrag serve``
(``--config``/``--set``). On Milvus Lite while ``mmrag serve`` runs, it writes through the Lite server the
server started (found by ``<lite path>.server.json``), so the server's retriever sees the documents at once;
with no server running it opens the Lite path itself. Or through the server's own API: ``--server URL
--vector-store NAME`` uploads the files to its Files API and indexes them in one of its vector stores
(:mod:`mmrag.serving.files.remote`).
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
    remote = parser.add_argument_group("through a running server (instead of opening Milvus)")
    remote.add_argument(
        "--server", default=None, metavar="URL", help="The server's base URL, e.g. http://127.0.0.1:8000."
    )
    remote.add_argument(
        "--vector-store", default=None, metavar="NAME|ID", help="Target store: a vs_ id, or a name (created if new)."
    )
    remote.add_argument(
        "--api-key", default=None, help="Bearer key (default $MMRAG_API_KEY, else $OPENAI_API_KEY, else none)."
    )
    remote.add_argument("--timeout", type=float, default=600.0, help="Seconds to wait for indexing to finish.")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.server or args.vector_store:
        return run_remote(args)
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
        if store.lite_server is not None:
            print(f"mmrag ingest: through the Milvus Lite server at {store.lite_server}", file=sys.stderr)
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


def run_remote(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import httpx

    from mmrag.serving.files.remote import SERVER_SUFFIXES, RemoteError, ingest_through_server
    from mmrag.serving.retrieval.ingest import find_files, source_name

    if not (args.server and args.vector_store):
        print("mmrag ingest: error: --server and --vector-store go together", file=sys.stderr)
        return 2
    if args.collection:
        print(
            "mmrag ingest: error: --collection is for direct ingestion; with --server use --vector-store",
            file=sys.stderr,
        )
        return 2
    chunking = {"max_chunk_size_tokens": args.chunk_tokens, "chunk_overlap_tokens": args.overlap_tokens}
    chunking = {k: v for k, v in chunking.items() if v is not None}
    key = args.api_key or os.environ.get("MMRAG_API_KEY") or os.environ.get("OPENAI_API_KEY")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    base = args.server.rstrip("/").removesuffix("/v1")
    try:
        files = find_files(args.paths, SERVER_SUFFIXES)
        with httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(120.0, connect=5.0)) as http:
            summary = ingest_through_server(
                http,
                files,
                args.vector_store,
                source_of=lambda path: source_name(path, Path.cwd()),
                replace=args.replace,
                chunking=chunking or None,
                timeout_s=args.timeout,
                progress=None if args.no_progress else lambda line: print(line, file=sys.stderr),
            )
    except (RemoteError, ValueError, FileNotFoundError) as exc:
        print(f"mmrag ingest: error: {exc}", file=sys.stderr)
        return 2
    for path, reason in summary.failed:
        print(f"mmrag ingest: {path}: {reason}", file=sys.stderr)
    print(summary.describe())
    return 1 if summary.failed else 0
