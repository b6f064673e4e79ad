"""``KVCompactionWorker``: vLLM's CPU worker whose model runner compacts a request's KV cache after its prefill.

Pinned to vLLM 0.32 (``v1/worker/gpu_model_runner.py``, which the CPU runner extends). Generic over the KV
methods of :mod:`mmrag.kernels.methods`, chosen per request. What changes, per compacted request
(:func:`~mmrag.serving.vllm_plugin.kv.plan.plan_compaction`):

- **Prefill step.** Each decoder attention layer runs vLLM's kernel on the whole prompt as usual (the
  first token is sampled from full attention, as in LOOK-M), then has the request's method score the
  prompt entries from the same Q and K and keep (and merge) them, exactly as the reference engine calls
  it, and writes the ``kept`` entries to
  the request's first ``kept`` slots through the backend's own cache write (layout-safe: the CPU cache
  stores K transposed).
- **Next step.** The request's block table is cut to ``ceil(kept / block_size)`` blocks, matching what
  the scheduler freed; new block ids are then appended as usual.
- **Every later step.** Positions stay logical (RoPE), slots and ``seq_lens`` become physical: both are
  shifted by ``prompt_len - kept``.

Only the V1 runner on the CPU platform: the GPU's default Model Runner V2 keeps positions, sequence
lengths and block tables elsewhere, and async scheduling would free the tail before the write; neither
is implemented here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from vllm.model_executor.layers.attention.attention import Attention
from vllm.v1.attention.backend import AttentionType
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from mmrag.kernels.methods.base import KVMethod
from mmrag.serving.vllm_plugin.kv.plan import (
    KVPlan,
    deployment_method,
    image_mask,
    image_spans,
    is_fresh_prefill,
    plan_compaction,
    request_method,
)

__all__ = ["KVCompactionRunner", "KVCompactionWorker"]


class KVCompactionWorker(CPUWorker):
    def init_device(self) -> None:
        super().init_device()
        if type(self.model_runner) is not CPUModelRunner:
            raise RuntimeError(
                f"KV compaction needs vLLM's V1 CPU model runner, got {type(self.model_runner).__name__} "
                "(unset VLLM_USE_V2_MODEL_RUNNER)"
            )
        # The runner is built inside CPUWorker.init_device; switching its class keeps that code untouched.
        self.model_runner.__class__ = KVCompactionRunner
        self.model_runner.init_kv_compaction()


@dataclass(frozen=True)
class _Compaction:
    """One request compacted in the current step: its method, its tokens in the batch and where the kept go."""

    method: KVMethod
    start: int
    end: int
    is_image: torch.Tensor  # (prompt_len,) bool
    kept: int
    slots: torch.Tensor  # (kept,) int64 physical cache slots


class KVCompactionRunner(CPUModelRunner):
    default_kv_method: KVMethod | None
    _kv_offsets: dict[str, int]  # compacted requests: logical - physical position
    _kv_pending: dict[str, KVPlan]  # compacted in the last step: block table not cut yet
    _kv_step: list[_Compaction]  # compacted by this step's forward

    def init_kv_compaction(self) -> None:
        self.default_kv_method = deployment_method(self.vllm_config.additional_config)
        self._kv_offsets, self._kv_pending, self._kv_step = {}, {}, []
        table_block_size = self.input_batch.block_table.block_tables[0].block_size
        if len(self.input_batch.block_table.block_tables) != 1 or table_block_size != self.cache_config.block_size:
            raise RuntimeError("KV compaction needs one KV cache group whose kernel blocks are the scheduler's blocks")

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        for layer in self.compilation_config.static_forward_context.values():
            if isinstance(layer, Attention) and layer.attn_type == AttentionType.DECODER:
                _compact_after_forward(layer, self)

    def execute_model(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().execute_model(*args, **kwargs)
        finally:
            self._kv_step = []

    def _update_states(self, scheduler_output: Any) -> Any:
        finished = scheduler_output.finished_req_ids
        for request_id, plan in self._kv_pending.items():
            if request_id not in finished:
                self._cut_block_table(request_id, plan)
        self._kv_pending.clear()
        # Finished requests go; resumed ones were preempted, lost every block, and re-prefill in full.
        for request_id in finished | scheduler_output.scheduled_cached_reqs.resumed_req_ids:
            self._kv_offsets.pop(request_id, None)
        return super()._update_states(scheduler_output)

    def _cut_block_table(self, request_id: str, plan: KVPlan) -> None:
        table = self.input_batch.block_table.block_tables[0]
        keep = plan.kept_blocks(table.block_size)
        del self.requests[request_id].block_ids[0][keep:]  # the source a row is rebuilt from
        row = self.input_batch.req_id_to_index.get(request_id)
        if row is not None:
            table.block_table.np[row, keep : table.num_blocks_per_row[row]] = 0
            table.num_blocks_per_row[row] = keep
        self._kv_offsets[request_id] = plan.offset

    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> Any:
        prepared = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        num_reqs = self.input_batch.num_reqs
        request_ids = self.input_batch.req_ids[:num_reqs]
        self._kv_step = self._plan_step(request_ids, num_scheduled_tokens)
        offsets = np.array([self._kv_offsets.get(r, 0) for r in request_ids], dtype=np.int64)
        if offsets.any():
            self._shift_to_physical(num_reqs, num_scheduled_tokens, offsets)
        return prepared

    def _plan_step(self, request_ids: list[str], num_scheduled_tokens: np.ndarray) -> list[_Compaction]:
        step = []
        for row, request_id in enumerate(request_ids):
            state = self.requests[request_id]
            if not is_fresh_prefill(
                prompt_len=state.num_prompt_tokens,
                num_scheduled=int(num_scheduled_tokens[row]),
                num_computed_before=int(self.input_batch.num_computed_tokens_cpu[row]),
                num_output_tokens=len(state.output_token_ids),
            ):
                continue
            extra_args = state.sampling_params.extra_args if state.sampling_params else None
            spans = image_spans(state.mm_features)
            plan = plan_compaction(
                request_method(extra_args, self.default_kv_method), prompt_len=state.num_prompt_tokens, spans=spans
            )
            if plan is None:
                continue
            start = int(self.query_start_loc.np[row])
            mask = image_mask(plan.prompt_len, spans)
            slots = self._first_slots(row, plan.kept)
            step.append(_Compaction(plan.method, start, start + plan.prompt_len, mask, plan.kept, slots))
            self._kv_pending[request_id] = plan
        return step

    def _first_slots(self, row: int, count: int) -> torch.Tensor:
        """Cache slots of the request's first ``count`` entries, in order, across its blocks."""
        table = self.input_batch.block_table.block_tables[0]
        size = table.block_size
        blocks = torch.from_numpy(table.block_table.np[row, : math.ceil(count / size)].astype(np.int64))
        index = torch.arange(count)
        return blocks[index // size] * size + index % size

    def _shift_to_physical(self, num_reqs: int, num_scheduled_tokens: np.ndarray, offsets: np.ndarray) -> None:
        """Slots and sequence lengths of compacted requests move back by their offset; positions stay."""
        total = int(num_scheduled_tokens.sum())
        token_offsets = torch.from_numpy(np.repeat(offsets, num_scheduled_tokens[:num_reqs]))
        physical = self.positions[:total] - token_offsets.to(self.positions.dtype)
        self.input_batch.block_table.compute_slot_mapping(num_reqs, self.query_start_loc.gpu[: num_reqs + 1], physical)
        shift = torch.from_numpy(offsets)
        self.seq_lens[:num_reqs] -= shift.to(self.seq_lens.dtype)
        if self.optimistic_seq_lens_cpu.data_ptr() != self.seq_lens.data_ptr():
            self.optimistic_seq_lens_cpu[:num_reqs] -= shift.to(self.optimistic_seq_lens_cpu.dtype)


def _compact_after_forward(layer: Attention, runner: KVCompactionRunner) -> None:
    """Wrap the layer's backend ``forward`` (looked up at call time by vLLM's attention op)."""
    impl = layer.impl
    forward = impl.forward

    def forward_then_compact(
        attn_layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
        attn_metadata: Any, *args: Any, **kwargs: Any,
    ) -> torch.Tensor:  # fmt: skip
        output = forward(attn_layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
        if attn_metadata is not None:
            for compaction in runner._kv_step:
                _compact_prompt(impl, attn_layer, query, key, value, kv_cache, compaction)
        return output

    impl.forward = forward_then_compact


def _compact_prompt(
    impl: Any,
    layer: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    compaction: _Compaction,
) -> None:
    """Score one prompt's entries in this layer, keep (and merge) them, write them to its first slots."""
    span = slice(compaction.start, compaction.end)
    length = compaction.end - compaction.start
    q = query[span].view(length, impl.num_heads, impl.head_size).transpose(0, 1)
    k = key[span].view(length, impl.num_kv_heads, impl.head_size).transpose(0, 1)
    v = value[span].view(length, impl.num_kv_heads, impl.head_size).transpose(0, 1)
    method = compaction.method
    scores = method.scores(None, q, k, impl.scale)  # vLLM's kernels expose no probabilities
    kept_k, kept_v, _ = method.compress(k, v, scores, compaction.is_image)
    if kept_k.shape[1] != compaction.kept:
        raise RuntimeError(f"{method.name} kept {kept_k.shape[1]} entries, the scheduler planned {compaction.kept}")
    impl.do_kv_cache_update(
        layer, kept_k.transpose(0, 1).contiguous(), kept_v.transpose(0, 1).contiguous(), kv_cache, compaction.slots
    )
