"""Lines answered concurrently on one in-process engine.

vLLM's ``AsyncLLM`` batches whatever requests are in flight (continuous batching), so offline batching
here is simply up to ``concurrency`` lines in flight at once; each is recorded as soon as it finishes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from mmrag.serving.batch.chain import BatchChain, LazyRetriever
from mmrag.serving.batch.records import BatchLine
from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.protocol import Engine


async def answer_all(
    lines: Iterable[BatchLine],
    answer: Callable[[BatchLine], Awaitable[dict[str, Any]]],
    record: Callable[[dict[str, Any]], None],
    concurrency: int,
) -> None:
    """``concurrency`` workers pull from one iterator, so a large file never becomes one task per line."""
    pending = iter(lines)

    async def worker() -> None:
        for line in pending:
            record(await answer(line))

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def start_engine(config: MmragConfig, engine_cls: str | None) -> Engine:
    """The LLM stage's engine, loaded as ``deployments/llm.py`` loads it (vLLM unless ``engine_cls``)."""
    from mmrag.deployments.llm import DEFAULT_ENGINE, load_engine_class
    from mmrag.serving.models.resolve import resolve_model_path

    engine = load_engine_class(engine_cls or DEFAULT_ENGINE)(config, resolve_model_path(config.model))
    await engine.start()
    return engine


async def run_local(
    config: MmragConfig,
    lines: list[BatchLine],
    record: Callable[[dict[str, Any]], None],
    *,
    engine_cls: str | None,
    concurrency: int,
) -> None:
    from mmrag.serving.openai.server import LocalBackend

    engine = await start_engine(config, engine_cls)
    try:
        chain = BatchChain(config, LocalBackend(engine, LazyRetriever(config)))
        await answer_all(lines, chain.answer, record, concurrency)
    finally:
        await engine.shutdown()
