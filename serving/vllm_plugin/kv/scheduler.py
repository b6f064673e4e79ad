"""``KVCompactionScheduler``: vLLM's scheduler, with a compacted request's tail blocks returned to the pool.

Pinned to vLLM 0.32 (``v1/core/sched/scheduler.py``, ``v1/core/single_type_kv_cache_manager.py``). vLLM
has no API to free a request's *tail* blocks, so this edits the full-attention manager's ``req_to_blocks``
(private state), checked at start. Generic over the KV methods of :mod:`mmrag.kernels.methods`: it needs
only a method's kept count.

Per compacted request (:func:`~mmrag.serving.vllm_plugin.kv.plan.plan_compaction`):

1. ``schedule`` of the step that runs its single-chunk prefill records the plan (blocks for the whole
   prompt were allocated as usual: admission and peak prefill memory are unchanged);
2. ``update_from_output`` of that step, once the worker has written the compacted entries to the first
   ``kept`` slots, keeps ``ceil(kept / block_size)`` blocks and frees the rest;
3. from then on every allocation for the request counts ``num_tokens - offset`` physical tokens, so a
   new block is taken only when the *compacted* cache fills its last block.

``num_computed_tokens`` and ``max_model_len`` stay logical. Preemption frees all the blocks and the
request re-prefills uncompacted (the rule leaves resumed requests alone), so the offset is dropped.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from mmrag.serving.vllm_plugin.kv.plan import (
    KVPlan,
    deployment_method,
    image_spans,
    is_fresh_prefill,
    plan_compaction,
    request_method,
)

__all__ = ["KVCompactionScheduler"]

logger = logging.getLogger(__name__)


class KVCompactionScheduler(Scheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.default_kv_method = deployment_method(self.vllm_config.additional_config)
        self._planned: dict[str, KVPlan] = {}  # prefill scheduled this step, tail not freed yet
        self._offsets: dict[str, int] = {}  # compacted requests: logical - physical length
        self._manager = _single_full_attention_manager(self.kv_cache_manager)
        self._install_offset_allocation()

    def _install_offset_allocation(self) -> None:
        """Make the manager size a compacted request's blocks by its physical length."""
        manager, offsets = self._manager, self._offsets
        blocks_to_allocate, allocate_new = manager.get_num_blocks_to_allocate, manager.allocate_new_blocks

        def get_num_blocks_to_allocate(request_id: str, num_tokens: int, *args: Any, **kwargs: Any) -> int:
            return blocks_to_allocate(request_id, num_tokens - offsets.get(request_id, 0), *args, **kwargs)

        def allocate_new_blocks(request_id: str, num_tokens: int, num_tokens_main_model: int) -> list[Any]:
            offset = offsets.get(request_id, 0)
            return allocate_new(request_id, num_tokens - offset, num_tokens_main_model - offset)

        manager.get_num_blocks_to_allocate = get_num_blocks_to_allocate
        manager.allocate_new_blocks = allocate_new_blocks

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        output = super().schedule(*args, **kwargs)
        for new in output.scheduled_new_reqs:
            request = self.requests[new.req_id]
            if not is_fresh_prefill(
                prompt_len=request.num_prompt_tokens,
                num_scheduled=output.num_scheduled_tokens[new.req_id],
                num_computed_before=new.num_computed_tokens,
                num_output_tokens=request.num_output_tokens,
            ):
                continue
            extra_args = request.sampling_params.extra_args if request.sampling_params else None
            method = request_method(extra_args, self.default_kv_method)
            plan = plan_compaction(method, prompt_len=request.num_prompt_tokens, spans=image_spans(request.mm_features))
            if plan is not None:
                self._planned[new.req_id] = plan
        return output

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output: Any) -> Any:
        # Before super(): a request that finishes in this step still holds its blocks here.
        for request_id, plan in self._planned.items():
            if request_id in self.requests:
                self._free_tail(request_id, plan)
        self._planned.clear()
        return super().update_from_output(scheduler_output, model_runner_output)

    def _free_tail(self, request_id: str, plan: KVPlan) -> None:
        blocks = self._manager.req_to_blocks[request_id]
        keep = plan.kept_blocks(self._manager.block_size)
        tail = blocks[keep:]
        del blocks[keep:]
        # Reverse order, as vLLM frees: the tail is evicted first from the free queue's head.
        self._manager.block_pool.free_blocks(reversed(tail))
        self._offsets[request_id] = plan.offset
        logger.debug(
            "KV compacted",
            extra={"request": request_id, "method": plan.method.name, "kept": plan.kept, "freed_blocks": len(tail)},
        )

    def _preempt_request(self, request: Request, *args: Any, **kwargs: Any) -> None:
        self._forget(request.request_id)
        super()._preempt_request(request, *args, **kwargs)

    def _free_request(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        self._forget(request.request_id)
        return super()._free_request(request, *args, **kwargs)

    def _forget(self, request_id: str) -> None:
        self._offsets.pop(request_id, None)
        self._planned.pop(request_id, None)


def _single_full_attention_manager(kv_cache_manager: Any) -> Any:
    """The one full-attention block manager; anything else (hybrid models, prefix caching) is refused."""
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    if kv_cache_manager.enable_caching:
        raise ValueError("KV compaction overwrites blocks in place: prefix caching must be off")
    managers = kv_cache_manager.coordinator.single_type_managers
    if len(managers) != 1 or type(managers[0]) is not FullAttentionManager:
        raise ValueError(
            f"KV compaction needs one full-attention KV cache group, got {[type(m).__name__ for m in managers]}"
        )
    manager = managers[0]
    for name in ("req_to_blocks", "block_pool", "get_num_blocks_to_allocate", "allocate_new_blocks"):
        if not hasattr(manager, name):
            raise RuntimeError(f"vLLM's KV cache manager has no {name!r}: KV compaction is pinned to vLLM 0.32")
    return manager
