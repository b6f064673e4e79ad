"""Which requests a KV method compacts inside vLLM, and to how many entries: pure functions, three callers.

The scheduler (it frees the tail blocks), the worker (it writes the compacted cache) and the frontend (it
reports the kept count in ``usage``) never talk to each other about a request's compaction; each derives
the same plan from what it already holds: the prompt length, the image placeholder spans and the request's
method. No vLLM import here, so tests call it without vLLM.

A request's method travels as :func:`~mmrag.kernels.methods.kv_method_as_dict` in
``SamplingParams.extra_args[REQUEST_KEY]``; a request without it gets the deployment's method, which
travels the same way in vLLM's ``additional_config[ADDITIONAL_CONFIG_KEY]`` (every process sees it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mmrag.kernels.methods import NO_KV_METHOD, kv_method_as_dict, kv_method_from_dict
from mmrag.kernels.methods.base import KVMethod

__all__ = [
    "ADDITIONAL_CONFIG_KEY",
    "REQUEST_KEY",
    "VISUAL_MODALITIES",
    "KVPlan",
    "deployment_method",
    "deployment_method_config",
    "image_mask",
    "image_spans",
    "is_fresh_prefill",
    "plan_compaction",
    "request_extra_args",
    "request_method",
]

ADDITIONAL_CONFIG_KEY = "mmrag_kv"
REQUEST_KEY = "mmrag_kv"


def deployment_method_config(method: KVMethod) -> dict[str, Any]:
    """The ``additional_config`` entry that makes ``method`` the deployment's default."""
    return {ADDITIONAL_CONFIG_KEY: kv_method_as_dict(method)}


def deployment_method(additional_config: Mapping[str, Any] | None) -> KVMethod | None:
    """The deployment's method, or None when it does not compact by default."""
    raw = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    return None if raw is None else kv_method_from_dict(raw)


def request_extra_args(method: KVMethod | None) -> dict[str, Any]:
    """``SamplingParams.extra_args`` carrying a request's method (None: keep the whole cache)."""
    return {REQUEST_KEY: {"method": NO_KV_METHOD} if method is None else kv_method_as_dict(method)}


def request_method(extra_args: Mapping[str, Any] | None, default: KVMethod | None) -> KVMethod | None:
    """The request's method: its own when it names one, else the deployment's."""
    raw = (extra_args or {}).get(REQUEST_KEY)
    return default if raw is None else kv_method_from_dict(raw)


@dataclass(frozen=True)
class KVPlan:
    """One request's compaction: ``kept`` of its ``prompt_len`` prompt entries stay, by ``method``."""

    method: KVMethod
    prompt_len: int
    kept: int

    @property
    def offset(self) -> int:
        """Logical minus physical position of every later token (RoPE positions stay logical)."""
        return self.prompt_len - self.kept

    def kept_blocks(self, block_size: int) -> int:
        return math.ceil(self.kept / block_size)


# The modalities whose placeholders are "image" entries to the KV methods (a video's frames are images).
VISUAL_MODALITIES = ("image", "video")


def image_spans(mm_features: Iterable[Any] | None) -> list[tuple[int, int]]:
    """``(offset, length)`` of every image (and video) placeholder run (vLLM's ``MultiModalFeatureSpec``
    objects); xRAG's ``retrieval`` placeholders are not visual."""
    return [
        (feature.mm_position.offset, feature.mm_position.length)
        for feature in mm_features or ()
        if feature.modality in VISUAL_MODALITIES
    ]


def image_mask(prompt_len: int, spans: Iterable[tuple[int, int]]) -> torch.Tensor:
    """``(prompt_len,)`` bool, True on image entries."""
    mask = torch.zeros(prompt_len, dtype=torch.bool)
    for offset, length in spans:
        mask[offset : offset + length] = True
    return mask


def is_fresh_prefill(*, prompt_len: int, num_scheduled: int, num_computed_before: int, num_output_tokens: int) -> bool:
    """A prompt prefilled whole in this step: importance needs every prompt query (the deployment turns
    chunked prefill off for this). A request resumed after preemption re-prefills its outputs too; it
    keeps its full cache."""
    return num_computed_before == 0 and num_scheduled == prompt_len and num_output_tokens == 0


def plan_compaction(method: KVMethod | None, *, prompt_len: int, spans: list[tuple[int, int]]) -> KVPlan | None:
    """The compaction of a freshly prefilled prompt, or None: no method, no image, or nothing evicted."""
    if method is None or not spans:
        return None
    kept = method.kept_count(image_mask(prompt_len, spans))
    return KVPlan(method=method, prompt_len=prompt_len, kept=kept) if kept < prompt_len else None
