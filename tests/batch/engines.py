"""Test engines for batch runs, importable by path (``tests.batch.engines:RetrievalEchoEngine``)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from mmrag.serving.engine.protocol import GenerationDelta, GenerationRequest
from tests.fake_engine import FakeEngine


class RetrievalEchoEngine(FakeEngine):
    """The fake engine, plus what the vLLM engine does with retrieval: the first delta carries its info."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        info = request.retrieval.info if request.retrieval else None
        async for delta in super().generate(request):
            yield dataclasses.replace(delta, retrieval=info)
            info = None
