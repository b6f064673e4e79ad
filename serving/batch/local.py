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
    from mmrag.serving.engine.protocol import DEFAULT_ENGINE, load_engine_class
    from mmrag.serving.models.registry import model_path

    engine_class = load_engine_class(engine_cls or DEFAULT_ENGINE)
    engine = engine_class(without_engine_stats(config), model_path(config.model))
    await engine.start()
    return engine


def without_engine_stats(config: MmragConfig) -> MmragConfig:
    """A batch has no ``/metrics`` to feed: vLLM's per-token statistics would only cost time on the
    process that also renders prompts (about a fifth of it on the tiny model), unless the config asks."""
    engine_kwargs = {"disable_log_stats": True, **config.engine.engine_kwargs}
    return config.model_copy(update={"engine": config.engine.model_copy(update={"engine_kwargs": engine_kwargs})})


async def run_local(
    config: MmragConfig,
    lines: list[BatchLine],
    record: Callable[[dict[str, Any]], None],
    *,
    engine_cls: str | None,
    concurrency: int,
    on_ready: Callable[[], None] = lambda: None,
) -> None:
    from mmrag.serving.pipeline import LocalBackend

    engine = await start_engine(config, engine_cls)
    on_ready()
    try:
        chain = BatchChain(config, LocalBackend(engine, LazyRetriever(config)))
        await answer_all(lines, chain.answer, record, concurrency)
    finally:
        await engine.shutdown()
