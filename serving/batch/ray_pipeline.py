"""``mmrag batch --ray``: the same chain over Ray Data, with an actor pool per stage.

Two ``map_batches`` stages: :class:`PrepareStage` (validation, images, retrieval; sized like the
retriever deployment, ``deployments.retriever``) and :class:`GenerateStage` (one engine per actor; sized
like ``deployments.llm``: ``num_replicas`` actors, each with ``num_cpus``/``num_gpus``). Ray Data streams
between them; the driver writes each finished line to the output as it arrives, so output and resume
are those of the in-process path. Ray is ``server.ray_address`` (a cluster) or a local one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from mmrag.serving.batch.records import BatchLine
from mmrag.serving.config import DeploymentConfig, MmragConfig
from mmrag.serving.ray_start import local_start_environment

logger = logging.getLogger(__name__)

POOL_START_TIMEOUT_S = 1800  # engines that download and load a large checkpoint take minutes


class _ChainActor:
    """A chain with its own event loop: the loop outlives each batch, as the engine's tasks need."""

    def __init__(self, config: dict[str, Any]):
        from mmrag.serving.logs import configure_logging

        self.config = MmragConfig.model_validate(config)
        configure_logging(self.config.server)
        self.loop = asyncio.new_event_loop()

    def run_all(self, coroutines: list) -> list:
        async def gather() -> list:
            return await asyncio.gather(*coroutines)

        return self.loop.run_until_complete(gather())


class PrepareStage(_ChainActor):
    """Rows ``line`` (JSON of a BatchLine) -> ``record`` (JSON; set when the line already failed) and
    ``prepared`` (a pickled PreparedLine for the LLM stage; empty when it failed)."""

    def __init__(self, config: dict[str, Any]):
        from mmrag.serving.batch.chain import BatchChain, LazyRetriever
        from mmrag.serving.pipeline import LocalBackend

        super().__init__(config)
        # LocalBackend without an engine: this stage never generates.
        self.chain = BatchChain(self.config, LocalBackend(None, LazyRetriever(self.config)))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lines = [BatchLine(**json.loads(text)) for text in batch["line"]]
        results = self.run_all([self.chain.prepare(line) for line in lines])
        records = [json.dumps(r) if isinstance(r, dict) else "" for r in results]
        prepared = [b"" if isinstance(r, dict) else pickle.dumps(r) for r in results]
        return {"record": np.array(records, dtype=object), "prepared": np.array(prepared, dtype=object)}


class GenerateStage(_ChainActor):
    """Rows from :class:`PrepareStage` -> ``record`` (JSON output line) for every row."""

    def __init__(self, config: dict[str, Any], engine_cls: str | None):
        from mmrag.serving.batch.chain import BatchChain
        from mmrag.serving.batch.local import start_engine
        from mmrag.serving.pipeline import LocalBackend

        super().__init__(config)
        self.engine = self.loop.run_until_complete(start_engine(self.config, engine_cls))
        self.chain = BatchChain(self.config, LocalBackend(self.engine))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # The whole batch is in flight at once, so the engine batches it.
        pending = [(i, pickle.loads(blob)) for i, blob in enumerate(batch["prepared"]) if blob]
        answers = self.run_all([self.chain.generate(p) for _, p in pending])
        records = list(batch["record"])
        for (i, _), answer in zip(pending, answers, strict=True):
            records[i] = json.dumps(answer)
        return {"record": np.array(records, dtype=object)}


def run_on_ray(
    config: MmragConfig,
    lines: list[BatchLine],
    record: Callable[[dict[str, Any]], None],
    *,
    engine_cls: str | None,
    batch_size: int,
) -> None:
    import ray
    import ray.data

    started_ray = not ray.is_initialized()
    if started_ray:
        os.environ.update(local_start_environment(config.server.ray_address))
        ray.init(
            address=config.server.ray_address,
            num_cpus=config.server.ray_num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    context = ray.data.DataContext.get_current()
    # Our bar and summary report progress; Ray Data's own progress lines would interleave with them.
    context.enable_progress_bars = False
    # Each pool waits for its minimum actors (engines loaded) before taking blocks: otherwise the first
    # replica up takes the whole of a short job, and a cluster that cannot place a pool hangs instead of
    # failing with Ray's "not enough resources" timeout.
    context.wait_for_min_actors_s = POOL_START_TIMEOUT_S
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        dataset = build_dataset(config, lines, engine_cls=engine_cls, batch_size=batch_size)
        for row in dataset.iter_rows():
            record(json.loads(row["record"]))
    finally:
        if started_ray:
            ray.shutdown()


def build_dataset(config: MmragConfig, lines: list[BatchLine], *, engine_cls: str | None, batch_size: int):
    import ray.data

    payload = config.model_dump()
    retriever, llm = config.deployments.retriever, config.deployments.llm
    rows = [{"line": json.dumps(asdict(line))} for line in lines]
    # Blocks of about one LLM batch each: enough to keep both pools busy without tiny tasks.
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 256)))
    dataset = dataset.map_batches(
        PrepareStage,
        fn_constructor_args=(payload,),
        batch_size=batch_size,
        compute=actor_pool(retriever),
        num_cpus=retriever.num_cpus,
        num_gpus=retriever.num_gpus,
    )
    return dataset.map_batches(
        GenerateStage,
        fn_constructor_args=(payload, engine_cls),
        batch_size=batch_size,
        compute=actor_pool(llm),
        num_cpus=llm.num_cpus,
        num_gpus=llm.num_gpus,
    )


def actor_pool(deployment: DeploymentConfig):
    """The stage's pool sized like its Serve deployment: fixed replicas, or the autoscaling range."""
    import ray.data

    scaling = deployment.autoscaling
    if scaling is None:
        return ray.data.ActorPoolStrategy(size=deployment.num_replicas)
    return ray.data.ActorPoolStrategy(min_size=max(1, scaling.min_replicas), max_size=scaling.max_replicas)
