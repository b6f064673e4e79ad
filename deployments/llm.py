"""The LLM stage: one replica owns one engine (vLLM's ``AsyncLLM`` by default) and streams deltas."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from mmrag.deployments.replica import start_replica
from mmrag.serving.engine.protocol import DEFAULT_ENGINE, GenerationDelta, GenerationRequest, load_engine_class
from mmrag.serving.models.registry import model_path

logger = logging.getLogger(__name__)


@serve.deployment(name="LLMServer")
class LLMServer:
    """Serve calls ``check_health`` periodically too: a dead engine marks the replica unhealthy and Serve
    replaces it, while requests in flight fail with a 503 rather than hang."""

    async def __init__(self, config: dict[str, Any], engine_cls: str = DEFAULT_ENGINE):
        self.config = start_replica(config)
        started = time.perf_counter()
        checkpoint = model_path(self.config.model)  # prepared into the cache on first use
        prepared = time.perf_counter()
        self.engine = load_engine_class(engine_cls)(self.config, checkpoint)
        await self.engine.start()
        logger.info(
            "LLM replica started: model found or prepared in %.1f s, engine started in %.1f s",
            prepared - started,
            time.perf_counter() - prepared,
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        async for delta in self.engine.generate(request):
            yield delta

    async def check_health(self) -> None:
        await self.engine.check_health()

    def metrics_text(self) -> str:
        return self.engine.metrics_text()

    async def __del__(self) -> None:
        await self.engine.shutdown()
