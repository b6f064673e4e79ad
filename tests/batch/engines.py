"""Test engines for batch runs, importable by path (``tests.batch.engines:RetrievalEchoEngine``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path

from mmrag.serving.engine.protocol import GenerationDelta, GenerationRequest
from tests.fake_engine import FakeEngine


class RetrievalEchoEngine(FakeEngine):
    """The fake engine, plus what the vLLM engine does with retrieval: the first delta carries its info."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        info = request.retrieval.info if request.retrieval else None
        async for delta in super().generate(request):
            yield dataclasses.replace(delta, retrieval=info)
            info = None


class StartLoggingEngine(FakeEngine):
    """The fake engine, leaving one file named by its process id in ``$MMRAG_TEST_ENGINE_DIR`` on start
    (how a test sees where, and how many, engines ran)."""

    async def start(self) -> None:
        folder = Path(os.environ["MMRAG_TEST_ENGINE_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / str(os.getpid())).touch()
