"""``mmrag batch INPUT.jsonl OUTPUT.jsonl``: answer a file of OpenAI Batch requests, resumably."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from mmrag.serving.cli.common import add_config_arguments, load_config

HELP = "Answer an OpenAI Batch file (JSONL) through the chain; rerun with the same OUTPUT to resume."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="Input JSONL: {custom_id, method: POST, url: /v1/chat/completions, body}.")
    parser.add_argument("output", help="Output JSONL, appended; lines already in it are skipped (resume).")
    add_config_arguments(parser)
    parser.add_argument("--ray", action="store_true", help="Run over Ray Data actor pools (server.ray_address).")
    parser.add_argument(
        "--concurrency", type=_positive_int, default=None, help="Requests in flight per engine (default 512)."
    )
    parser.add_argument(
        "--engine", default=None, metavar="MODULE:CLASS", help="Engine class import path (default: vLLM)."
    )
    parser.add_argument("--no-progress", action="store_true", help="No progress bar (logs and summary only).")


def run(args: argparse.Namespace) -> int:
    from mmrag.serving.batch.job import BatchOptions, run_batch
    from mmrag.serving.batch.records import BatchInputError
    from mmrag.serving.logs import configure_logging

    config = load_config(args)
    configure_logging(config.server)
    options = BatchOptions(use_ray=args.ray, engine_cls=args.engine, show_progress=not args.no_progress)
    if args.concurrency is not None:
        options = dataclasses.replace(options, concurrency=args.concurrency)
    try:
        summary = run_batch(args.input, args.output, config, options)
    except BatchInputError as exc:
        print(f"mmrag batch: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Every answer finished so far is in the output, flushed; only the requests in flight are lost.
        print(f"mmrag batch: interrupted; rerun the same command to resume into {args.output}", file=sys.stderr)
        return 130
    print(f"batch {summary.describe()}", flush=True)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value
