"""What the plugin's parity tests of a model family (Qwen2.5-VL, LLaVA-OneVision) share: the engines, stock
vLLM's and the plugin's, built alike (so that the same kernels run on the same shapes), greedy sampling
with log-probabilities, and the tally of how vLLM's decodings agree with the reference's."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from tests.vllm_plugin.conftest import noise_picture

BLOCK_SIZE = 32  # the CPU attention backend takes multiples of 32
# fp32 on both sides; the measured max |difference| of the chosen tokens' log-probabilities is printed.
LOGPROB_ATOL = 1e-4
# What engine_kwargs adds for the plugin (its class, scheduler, worker, methods): stock vLLM runs without.
_PLUGIN_ARGUMENTS = ("hf_overrides", "scheduler_cls", "worker_cls", "additional_config")


def noise_pictures(sizes: list[tuple[int, int]], seed: int) -> list:
    """One seeded noise picture per ``(height, width)``, seeds counting up from ``seed``."""
    return [noise_picture(seed + i, h, w) for i, (h, w) in enumerate(sizes)]


def greedy_params(steps: int, extra_args: dict | None = None):
    """``steps`` greedy tokens whatever they are, each with its log-probability."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True, logprobs=0, extra_args=extra_args)


def chosen_logprobs(choice) -> torch.Tensor:
    return torch.tensor([choice.logprobs[i][t].logprob for i, t in enumerate(choice.token_ids)])


def parity_engine_kwargs(path, compression: dict, retrieval: dict | None = None, **engine: object) -> dict:
    """The server's engine arguments for the checkpoint ``path`` in fp32, with ``compression``, ``retrieval``
    (e.g. an xRAG projector) and the extra vLLM ``engine`` arguments (multimodal limits, processor arguments)."""
    from mmrag.serving.config import MmragConfig
    from mmrag.serving.engine.args import engine_kwargs

    config = MmragConfig.model_validate(
        {
            "engine": {
                "max_model_len": 1024,
                "dtype": "float32",
                "engine_kwargs": {"block_size": BLOCK_SIZE, **engine},
            },
            "compression": compression,
            "retrieval": retrieval or {},
        }
    )
    return engine_kwargs(config, str(path))


def without_plugin(kwargs: dict) -> dict:
    """The plugin engine's arguments for stock vLLM (its own model class): the same batching."""
    return {name: value for name, value in kwargs.items() if name not in _PLUGIN_ARGUMENTS}


@contextmanager
def in_process_llm(kwargs: dict) -> Iterator:
    """An ``LLM`` whose core runs in this process (as the plugin's, whose scheduler the tests read): both
    engines then run their kernels on the same threads. Shut down on leaving."""
    from vllm import LLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        llm = LLM(**kwargs)
    finally:
        if previous is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()


def plugin_engine(kwargs: dict) -> Iterator:
    """A module fixture's body: the plugin on ``kwargs`` (AIM at its deployment ratio, the KV worker) with no
    deployment KV method (each test's requests name theirs)."""
    with in_process_llm({**kwargs, "additional_config": {}}) as llm:
        yield llm


def processor_and_model(reference_cls, path):
    """The checkpoint's processor and ``reference_cls``'s model (fp32), loaded once for every reference
    settings a module's tests ask for."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path), reference_cls.from_pretrained(path).model


def scheduler(engine):
    return engine.llm_engine.engine_core.engine_core.scheduler


@dataclass
class Agreement:
    """How vLLM's greedy decodings agree with the reference's: how many have the same tokens, the largest
    log-probability difference among those, and the ones that differ (for the printout)."""

    same: int = 0
    total: int = 0
    max_diff: float = 0.0
    mismatched: list[tuple] = field(default_factory=list)

    def add(self, label: tuple, choice, expected) -> None:
        """``choice``: vLLM's completion; ``expected``: the reference's output of the same prompt."""
        self.total += 1
        if list(choice.token_ids) == expected.token_ids:
            self.same += 1
            self.max_diff = max(self.max_diff, float((chosen_logprobs(choice) - expected.logprobs).abs().max()))
        else:
            self.mismatched.append((*label, list(choice.token_ids), expected.token_ids))


def lookm_against_reference(engine, prompts: Callable, params, reference: Callable, lookm, visual: tuple[int, ...]):
    """``lookm`` per request (``params`` name it) on ``prompts(mm_processor_kwargs)``, at ratio 1 and after AIM
    1/2 (one halving), against the reference running the same method over its own cache, whose kept count
    must be the plan's (``visual``: the ids of the image entries). Returns the agreement and how many
    uncompacted reference decodings differ from the compacted ones (the compaction is seen)."""
    agreement, differs = Agreement(), 0
    for ratio, passes in ((1.0, 0), (0.5, 1)):
        outs = engine.generate(prompts({"aim_keep_ratio": ratio}), params, use_tqdm=False)
        for index, out in enumerate(outs):
            expected = reference(index, merge_passes=passes, kv=lookm)
            images = sum(out.prompt_token_ids.count(token) for token in visual)
            assert expected.kept == expected.prompt_len - images + math.ceil(images * lookm.image_budget)
            agreement.add((ratio, index), out.outputs[0], expected)
            differs += reference(index, merge_passes=passes).token_ids != expected.token_ids
    same, total, diff = agreement.same, agreement.total, agreement.max_diff
    print(f"LOOK-M: same tokens {same} of {total}; max |dlogprob| {diff:.3g}; uncompacted differs {differs}")
    return agreement, differs
