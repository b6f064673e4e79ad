"""The LLM stage: one replica owns one engine (vLLM's ``AsyncLLM`` by default) and streams deltas."""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.protocol import Engine, GenerationDelta, GenerationRequest
from mmrag.serving.logs import configure_logging
from mmrag.serving.models.resolve import resolve_model_path

logger = logging.getLogger(__name__)

DEFAULT_ENGINE = "mmrag.serving.engine.vllm_engine:VllmEngine"


def load_engine_class(import_path: str) -> type[Engine]:
    module, _, name = import_path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise TypeError(f"{import_path} is not an Engine subclass")
    return cls


@serve.deployment(name="LLMServer")
class LLMServer:
    """Serve calls ``check_health`` periodically too: a dead engine marks the replica unhealthy and Serve
    replaces it, while requests in flight fail with a 503 rather than hang."""

    async def __init__(self, config: dict[str, Any], engine_cls: str = DEFAULT_ENGINE):
        self.config = MmragConfig.model_validate(config)
        configure_logging(self.config.server)
        model_path = resolve_model_path(self.config.model)
        self.engine = load_engine_class(engine_cls)(self.config, model_path)
        await self.engine.start()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        async for delta in self.engine.generate(request):
            yield delta

    async def check_health(self) -> None:
        await self.engine.check_health()

    def metrics_text(self) -> str:
        return self.engine.metrics_text()

    async def __del__(self) -> None:
        await self.engine.shutdown()
