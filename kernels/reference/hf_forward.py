"""Pieces of the references that drive a transformers model through its public forward (Qwen2.5-VL,
LLaVA-OneVision): the prefill's queries and keys captured by a registered attention function, AIM's merged
tokens in reading order, the cache compacted by a KV method, and greedy decoding at explicit positions.

Each is derived from transformers' and the method's own code, independently of the vLLM plugin's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mmrag.kernels.methods.aim import AIMMerge
from mmrag.kernels.methods.base import KVMethod

__all__ = [
    "ReferenceOutput",
    "capture_prefill_attention",
    "compact_prefill_cache",
    "greedy_decode",
    "merge_in_reading_order",
]


@dataclass
class ReferenceOutput:
    """Attributes: token_ids: the greedy tokens. logprobs: ``(len(token_ids),)`` each chosen token's
    log-probability. prompt_len: tokens the LLM read. kept: prompt KV entries per layer and head after
    the KV method (``prompt_len`` without one)."""

    token_ids: list[int]
    logprobs: torch.Tensor
    prompt_len: int
    kept: int


def _capture(eager: Callable, module: nn.Module, query, key, value, attention_mask, scaling: float, **kwargs):
    """``eager`` attention; a prefill's post-RoPE queries, keys and values are kept on the module."""
    if query.shape[2] > 1:
        module.mmrag_prefill = (query, key, value)
    return eager(module, query, key, value, attention_mask, scaling, **kwargs)


def capture_prefill_attention(language_model: nn.Module, name: str, eager: Callable) -> None:
    """Run ``language_model``'s attention as ``eager`` (its model's eager attention, op for op) registered
    under ``name``, keeping each prefill's queries, keys and values for :func:`compact_prefill_cache`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(name, functools.partial(_capture, eager))
    # Its mask is eager attention's (an unregistered name gets none: attention would not be causal).
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, eager_mask)
    language_model.config._attn_implementation = name


def merge_in_reading_order(merge: AIMMerge, frames: torch.Tensor) -> torch.Tensor:
    """``(F, T, C)`` frames' tokens merged on their own to ``(F, kept, C)``, each frame's merged tokens sorted
    by the first input token each stands for (its ``source_index``)."""
    result = merge.apply(frames)
    count, tokens = frames.shape[:2]
    first = torch.full((count, result.tokens.shape[1]), tokens, dtype=torch.long)
    sources = torch.arange(tokens).expand(count, -1)
    first = first.scatter_reduce(1, result.source_index, sources, "amin")
    order = first.argsort(dim=1)
    return result.tokens.gather(1, order[..., None].expand_as(result.tokens))


def compact_prefill_cache(layers: nn.ModuleList, cache, kv: KVMethod, is_image: torch.Tensor) -> int:
    """Replace every layer's prompt cache by what ``kv`` keeps of it, scored from the prefill's captured
    queries and keys; returns the entries kept (the same count in each layer)."""
    kept = None
    for index, layer in enumerate(layers):
        attn = layer.self_attn
        q, k, v = attn.mmrag_prefill
        del attn.mmrag_prefill
        scores = kv.scores(None, q[0], k[0], attn.scaling)
        keys, values, _ = kv.compress(k[0], v[0], scores, is_image)
        cache.layers[index].keys, cache.layers[index].values = keys[None], values[None]
        kept = keys.shape[1]
    return int(kept)


def greedy_decode(
    model: nn.Module, cache, logits: torch.Tensor, max_new_tokens: int, next_position: int, position_shape
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens from the prefill's last ``logits`` on, each fed back at the next position (a tensor of
    ``position_shape``: ``(1, 1)``, or ``(3, 1, 1)`` for M-RoPE), and each chosen token's log-probability."""
    tokens, logprobs = [], []
    for step in range(max_new_tokens):
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(torch.log_softmax(logits.float(), dim=-1)[token])
        if step + 1 == max_new_tokens:
            break
        out = model(
            input_ids=torch.tensor([[token]]),
            position_ids=torch.full(position_shape, next_position + step),
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[0, -1]
    return tokens, torch.stack(logprobs)
