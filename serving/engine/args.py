"""The one place vLLM engine arguments are built from an :class:`~mmrag.serving.config.MmragConfig`.

The server (:class:`~mmrag.serving.engine.vllm_engine.VllmEngine`), ``mmrag batch``, the benchmarks and the
tests all call :func:`engine_kwargs` (``AsyncEngineArgs(**kwargs)`` or ``vllm.LLM(**kwargs)``), so a
setting such as AIM's ``hf_overrides`` or the KV-compaction scheduler is written once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmrag.serving.config import MmragConfig
from mmrag.serving.video import model_reads_video
from mmrag.serving.vllm_plugin.aim import KEEP_RATIO_KEY, ONEVISION_ARCHITECTURE, QWEN_VL_ARCHITECTURE, aim_overrides
from mmrag.serving.vllm_plugin.kv.plan import deployment_method_config

if TYPE_CHECKING:
    from vllm import AsyncEngineArgs

logger = logging.getLogger(__name__)


def build_engine_args(config: MmragConfig, model_path: str) -> AsyncEngineArgs:
    """:func:`engine_kwargs` as vLLM's ``AsyncEngineArgs``."""
    from vllm import AsyncEngineArgs

    return AsyncEngineArgs(**engine_kwargs(config, model_path))


def engine_kwargs(config: MmragConfig, model_path: str) -> dict[str, Any]:
    """vLLM engine arguments from our config; unknown ``engine_kwargs`` names fail here, at start."""
    from vllm import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(config.engine.engine_kwargs) - known)
    if unknown:
        raise ValueError(f"engine.engine_kwargs: unknown vLLM engine arguments {unknown}")
    kwargs: dict[str, Any] = {
        "limit_mm_per_prompt": {"image": config.limits.max_images_per_request},
        "disable_log_stats": False,  # keeps vLLM's Prometheus metrics on
        **config.engine.engine_kwargs,
    }
    if model_reads_video(config.model.name, model_path) and "video" not in kwargs["limit_mm_per_prompt"]:
        kwargs["limit_mm_per_prompt"] = {**kwargs["limit_mm_per_prompt"], "video": config.limits.max_videos_per_request}
    if aim_enabled(config, model_path):
        kwargs["hf_overrides"] = {
            **(kwargs.get("hf_overrides") or {}),
            **aim_overrides(model_path, config.compression.aim_keep_ratio, config.compression.aim_positions),
        }
    if config.retrieval.xrag.projector is not None:
        # The xRAG class extends the AIM one: one architecture serves both.
        kwargs["hf_overrides"] = {**(kwargs.get("hf_overrides") or {}), **xrag_overrides(config, model_path)}
        kwargs["limit_mm_per_prompt"] = {**kwargs["limit_mm_per_prompt"], "retrieval": config.retrieval.max_top_k}
    if config.compression.lookm.enabled:
        kwargs.update(kv_compaction_engine_kwargs(config, kwargs))
    return {
        "model": model_path,
        "served_model_name": [config.model.served_name],
        "max_model_len": config.engine.max_model_len,
        "dtype": config.engine.dtype,
        "enforce_eager": config.engine.enforce_eager,
        "seed": config.engine.seed,
        **kwargs,
    }


# Checkpoint architectures and vision towers the AIM plugin serves (mmrag.serving.vllm_plugin).
AIM_BASE_ARCHITECTURES = ("LlavaForConditionalGeneration",)
AIM_VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")


def aim_enabled(config: MmragConfig, model_path: str) -> bool:
    """Whether the plugin's AIM model serves this checkpoint; a ratio below 1 it cannot serve fails here."""
    if not config.compression.aim_plugin:
        if config.compression.aim_keep_ratio < 1.0:
            raise ValueError("compression.aim_keep_ratio < 1 needs compression.aim_plugin")
        return False
    config_file = Path(model_path) / "config.json"
    hf_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    architectures = hf_config.get("architectures") or []
    tower = (hf_config.get("vision_config") or {}).get("model_type", "clip_vision_model")  # HF's LLaVA default
    supported = any(a in AIM_BASE_ARCHITECTURES for a in architectures) and tower in AIM_VISION_TOWERS
    supported |= QWEN_VL_ARCHITECTURE in architectures  # its own tower and merger (vllm_plugin.qwen_vl)
    supported |= ONEVISION_ARCHITECTURE in architectures  # SigLIP and anyres tiles (vllm_plugin.onevision)
    if not supported and config.compression.aim_keep_ratio < 1.0:
        raise ValueError(
            f"compression.aim_keep_ratio: AIM supports {list(AIM_BASE_ARCHITECTURES)} with "
            f"{list(AIM_VISION_TOWERS)}, {QWEN_VL_ARCHITECTURE} and {ONEVISION_ARCHITECTURE}, "
            f"the checkpoint is {architectures} with {tower!r}"
        )
    return supported


def xrag_overrides(config: MmragConfig, model_path: str) -> dict[str, Any]:
    """``hf_overrides`` that make the checkpoint the plugin's xRAG model with the configured projector.

    The xRAG class is the checkpoint's family's (LLaVA, Qwen2.5-VL, LLaVA-OneVision), which extends that
    family's AIM class. Fails at start, naming what to fix, when the projector was trained for another LLM,
    the checkpoint is of no family the plugin serves, or its tokenizer has no ``<xrag>`` token.
    """
    from tokenizers import Tokenizer

    from mmrag.serving.vllm_plugin import XRAG_ARCHITECTURES
    from mmrag.serving.xrag.projector import XRAG_TOKEN, llm_identity, read_card

    projector = Path(config.retrieval.xrag.projector).resolve()
    read_card(projector).check(llm=llm_identity(model_path))
    architectures = json.loads((Path(model_path) / "config.json").read_text()).get("architectures") or []
    served = [XRAG_ARCHITECTURES[a] for a in architectures if a in XRAG_ARCHITECTURES]
    if not served:
        raise ValueError(f"retrieval.xrag: the plugin serves xRAG for {list(XRAG_ARCHITECTURES)}, not {architectures}")
    token_id = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json")).token_to_id(XRAG_TOKEN)
    if token_id is None:
        raise ValueError(
            f"retrieval.xrag: {model_path}'s tokenizer has no {XRAG_TOKEN} token (`mmrag train-projector` adds it)"
        )
    ratio = config.compression.aim_keep_ratio if config.compression.aim_plugin else 1.0
    return {
        "architectures": served[:1],
        "xrag_projector": str(projector),
        "xrag_token_index": token_id,
        KEEP_RATIO_KEY: ratio,
    }


KV_SCHEDULER = "mmrag.serving.vllm_plugin.kv.scheduler.KVCompactionScheduler"
KV_WORKER = "mmrag.serving.vllm_plugin.kv.worker.KVCompactionWorker"


def kv_compaction_engine_kwargs(config: MmragConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Engine arguments that compact KV caches: our scheduler and worker, the deployment's method (LOOK-M
    with ``compression.lookm``'s settings; requests may pick any registered method), and the vLLM features
    compaction cannot share.

    Prefix caching is turned off (compaction rewrites a request's blocks in place, which a shared cached
    block cannot take) and so is chunked prefill, with a batch budget of a whole context: importance
    needs every prompt query in the step that compacts. Settings that contradict this fail here.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise ValueError(
            "compression.lookm: KV compaction inside vLLM is implemented for the CPU worker only (vLLM 0.32's GPU "
            "runner V2 and async scheduling are not handled yet); turn it off on this platform"
        )
    for name in ("enable_prefix_caching", "enable_chunked_prefill"):
        if kwargs.get(name):
            raise ValueError(f"compression.lookm cannot run with engine.engine_kwargs.{name}=true")
    batch = max(config.engine.max_model_len, kwargs.get("max_num_batched_tokens") or 0)
    logger.info(
        "KV compaction on: prefix caching and chunked prefill off",
        extra={"max_num_batched_tokens": batch, **config.compression.lookm.model_dump()},
    )
    return {
        "scheduler_cls": KV_SCHEDULER,
        "worker_cls": KV_WORKER,
        "additional_config": {
            **(kwargs.get("additional_config") or {}),
            **deployment_method_config(config.compression.lookm.settings()),
        },
        "enable_prefix_caching": False,
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": batch,
    }
