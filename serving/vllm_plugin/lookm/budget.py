"""Which requests LOOK-M compacts inside vLLM, and to how many KV entries: one pure function, three callers.

The scheduler (it frees the tail blocks), the worker (it writes the compacted cache) and the frontend
(it reports the kept count in ``usage``) never talk to each other about a request's compaction; each
derives the same plan from what it already holds: the prompt length, the image placeholder spans, the
deployment settings and the request's override. No vLLM import here, so tests call it without vLLM.

The settings object is the reference engine's :class:`~mmrag.serving.reference.methods.LookM`, which the
worker also runs: one rule, the same kept count in every layer and head.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mmrag.serving.reference.methods import LookM

__all__ = [
    "ADDITIONAL_CONFIG_KEY",
    "REQUEST_KEY",
    "LookMPlan",
    "image_mask",
    "image_spans",
    "plan_compaction",
    "request_enabled",
    "settings_as_additional_config",
    "settings_from_additional_config",
]

# vLLM's ``additional_config`` key holding the deployment settings (every process sees the VllmConfig),
# and the ``SamplingParams.extra_args`` key of a request's override.
ADDITIONAL_CONFIG_KEY = "mmrag_lookm"
REQUEST_KEY = "mmrag_lookm"


def settings_from_additional_config(additional_config: Mapping[str, Any] | None) -> LookM | None:
    """The deployment's LOOK-M, or None when it does not compact.

    Scores are recomputed from Q and K in row chunks: vLLM's attention kernels expose no probabilities.
    """
    raw = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    return None if raw is None else LookM(**{**raw, "score_from": "chunked"})


def settings_as_additional_config(settings: LookM) -> dict[str, Any]:
    """The inverse of :func:`settings_from_additional_config` (JSON-safe: vLLM hashes its config)."""
    return {ADDITIONAL_CONFIG_KEY: dataclasses.asdict(settings)}


@dataclass(frozen=True)
class LookMPlan:
    """One request's compaction: ``kept`` of its ``prompt_len`` prompt entries stay in the KV cache."""

    prompt_len: int
    kept: int

    @property
    def offset(self) -> int:
        """Logical minus physical position of every later token (RoPE positions stay logical)."""
        return self.prompt_len - self.kept

    def kept_blocks(self, block_size: int) -> int:
        return math.ceil(self.kept / block_size)


def request_enabled(extra_args: Mapping[str, Any] | None) -> bool:
    """A request opts out with ``extra_args[REQUEST_KEY] = {"enabled": False}``; on by default."""
    override = (extra_args or {}).get(REQUEST_KEY) or {}
    return bool(override.get("enabled", True))


def image_spans(mm_features: Iterable[Any] | None) -> list[tuple[int, int]]:
    """``(offset, length)`` of every image placeholder run (vLLM's ``MultiModalFeatureSpec`` objects)."""
    return [
        (feature.mm_position.offset, feature.mm_position.length)
        for feature in mm_features or ()
        if feature.modality == "image"
    ]


def image_mask(prompt_len: int, spans: Iterable[tuple[int, int]]) -> torch.Tensor:
    """``(prompt_len,)`` bool, True on image entries."""
    mask = torch.zeros(prompt_len, dtype=torch.bool)
    for offset, length in spans:
        mask[offset : offset + length] = True
    return mask


def plan_compaction(
    settings: LookM | None,
    *,
    prompt_len: int,
    num_scheduled: int,
    num_computed_before: int,
    num_output_tokens: int,
    spans: list[tuple[int, int]],
    extra_args: Mapping[str, Any] | None,
) -> LookMPlan | None:
    """The compaction of a request at the step that runs its prefill, or None if it is not compacted.

    Compacted: a fresh prompt with images prefilled in one step (importance needs every prompt query;
    the deployment turns chunked prefill off for this), not opted out, that evicts at least one entry.
    Not compacted: a request resumed after preemption (it re-prefills its outputs too; it keeps its
    full cache), text-only prompts, prompts inside the budget.
    """
    if settings is None or not spans or not request_enabled(extra_args):
        return None
    if num_computed_before != 0 or num_scheduled != prompt_len or num_output_tokens != 0:
        return None
    kept = settings.kept_count(image_mask(prompt_len, spans))
    return LookMPlan(prompt_len=prompt_len, kept=kept) if kept < prompt_len else None
