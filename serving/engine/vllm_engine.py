"""The :class:`Engine` backed by vLLM's ``AsyncLLM`` (V1), owned by this process.

We own the engine rather than sit behind vLLM's OpenAI server because the chain renders the chat
itself: images are fetched by our guarded loader (never by vLLM), and later stages insert retrieved
documents and per-request compression settings as multimodal data, which vLLM's chat endpoint cannot
carry. Pinned to vLLM 0.32: ``AsyncLLM.renderer`` is how 0.32 turns a prompt into engine input.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import operator
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.protocol import (
    COMPLETION_RESERVE_TOKENS,
    CompressionCounts,
    Engine,
    GenerationDelta,
    GenerationRequest,
    SamplingOptions,
    TokenLogprob,
    text_rag_budget,
)
from mmrag.serving.openai.errors import EngineUnavailableError, InvalidRequestError
from mmrag.serving.retrieval.protocol import RetrievalResult, build_text_rag_messages
from mmrag.serving.vllm_plugin.aim import KEEP_RATIO_KEY, aim_overrides
from mmrag.serving.vllm_plugin.lookm.budget import REQUEST_KEY as LOOKM_REQUEST_KEY
from mmrag.serving.vllm_plugin.lookm.budget import plan_compaction, settings_as_additional_config
from mmrag.serving.xrag.projector import XRAG_TOKEN

if TYPE_CHECKING:
    from vllm import AsyncEngineArgs, SamplingParams

logger = logging.getLogger(__name__)


def build_engine_args(config: MmragConfig, model_path: str) -> AsyncEngineArgs:
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
        kwargs.update(lookm_engine_kwargs(config, kwargs))
    return AsyncEngineArgs(
        model=model_path,
        served_model_name=[config.model.served_name],
        max_model_len=config.engine.max_model_len,
        dtype=config.engine.dtype,
        enforce_eager=config.engine.enforce_eager,
        seed=config.engine.seed,
        **kwargs,
    )


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
    if not supported and config.compression.aim_keep_ratio < 1.0:
        raise ValueError(
            f"compression.aim_keep_ratio: AIM supports {list(AIM_BASE_ARCHITECTURES)} with "
            f"{list(AIM_VISION_TOWERS)}, the checkpoint is {architectures} with {tower!r}"
        )
    return supported


def xrag_overrides(config: MmragConfig, model_path: str) -> dict[str, Any]:
    """``hf_overrides`` that make the checkpoint the plugin's xRAG model with the configured projector.

    Fails at start, naming what to fix, when the projector was trained for another LLM, the checkpoint
    is not a LLaVA the plugin serves, or its tokenizer has no ``<xrag>`` token.
    """
    from tokenizers import Tokenizer

    from mmrag.serving.vllm_plugin import XRAG_ARCHITECTURE
    from mmrag.serving.xrag.projector import XRAG_TOKEN, llm_identity, read_card

    projector = Path(config.retrieval.xrag.projector).resolve()
    read_card(projector).check(llm=llm_identity(model_path))
    architectures = json.loads((Path(model_path) / "config.json").read_text()).get("architectures") or []
    if not any(a in AIM_BASE_ARCHITECTURES for a in architectures):
        raise ValueError(
            f"retrieval.xrag: the plugin serves xRAG for {list(AIM_BASE_ARCHITECTURES)}, not {architectures}"
        )
    token_id = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json")).token_to_id(XRAG_TOKEN)
    if token_id is None:
        raise ValueError(
            f"retrieval.xrag: {model_path}'s tokenizer has no {XRAG_TOKEN} token (`mmrag train-projector` adds it)"
        )
    ratio = config.compression.aim_keep_ratio if config.compression.aim_plugin else 1.0
    return {
        "architectures": [XRAG_ARCHITECTURE],
        "xrag_projector": str(projector),
        "xrag_token_index": token_id,
        KEEP_RATIO_KEY: ratio,
    }


LOOKM_SCHEDULER = "mmrag.serving.vllm_plugin.lookm.scheduler.LookMScheduler"
LOOKM_WORKER = "mmrag.serving.vllm_plugin.lookm.worker.LookMWorker"


def lookm_engine_kwargs(config: MmragConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Engine arguments that run LOOK-M: our scheduler and worker, and the vLLM features it cannot share.

    Prefix caching is turned off (compaction rewrites a request's blocks in place, which a shared cached
    block cannot take) and so is chunked prefill, with a batch budget of a whole context: importance
    needs every prompt query in the step that compacts. Settings that contradict this fail here.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise ValueError(
            "compression.lookm: LOOK-M inside vLLM is implemented for the CPU worker only (vLLM 0.32's GPU "
            "runner V2 and async scheduling are not handled yet); turn it off on this platform"
        )
    for name in ("enable_prefix_caching", "enable_chunked_prefill"):
        if kwargs.get(name):
            raise ValueError(f"compression.lookm cannot run with engine.engine_kwargs.{name}=true")
    batch = max(config.engine.max_model_len, kwargs.get("max_num_batched_tokens") or 0)
    logger.info(
        "LOOK-M on: prefix caching and chunked prefill off",
        extra={"max_num_batched_tokens": batch, **config.compression.lookm.model_dump()},
    )
    return {
        "scheduler_cls": LOOKM_SCHEDULER,
        "worker_cls": LOOKM_WORKER,
        "additional_config": {
            **(kwargs.get("additional_config") or {}),
            **settings_as_additional_config(config.compression.lookm.settings()),
        },
        "enable_prefix_caching": False,
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": batch,
    }


def load_chat_template(model_path: str) -> str:
    """The checkpoint's chat template: the processor's (LLaVA-style checkpoints) or the tokenizer's."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        template = getattr(AutoProcessor.from_pretrained(model_path), "chat_template", None)
    except (OSError, ValueError):
        template = None
    template = template or AutoTokenizer.from_pretrained(model_path).chat_template
    if not template:
        raise ValueError(f"{model_path}: the checkpoint has no chat template")
    return template


class VllmEngine(Engine):
    def __init__(self, config: MmragConfig, model_path: str):
        self._config = config
        self._model_path = model_path
        self._llm: Any = None
        self._chat_template = ""
        self._placeholders: list[str] = []
        self._aim = False
        self._lookm = config.compression.lookm.settings() if config.compression.lookm.enabled else None

    async def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        # The CPU backend sizes its KV cache from this variable; unset, it may not fit one NUMA node.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self._config.engine.kv_cache_space_gib))
        self._chat_template = load_chat_template(self._model_path)
        self._aim = aim_enabled(self._config, self._model_path)
        self._llm = AsyncLLM.from_engine_args(build_engine_args(self._config, self._model_path))
        self._placeholders = placeholder_tokens(self._llm.get_tokenizer())
        logger.info("vLLM engine started", extra={"model": self._model_path})

    @property
    def max_model_len(self) -> int:
        return self._config.engine.max_model_len

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        self._reject_placeholder_text(request.messages)
        if request.aim_keep_ratio is not None and not self._aim:
            raise InvalidRequestError(
                "AIM compression is not enabled for this deployment's model", param="compression.aim_keep_ratio"
            )
        if request.lookm and self._lookm is None:
            raise InvalidRequestError("LOOK-M is not enabled on this deployment", param="compression.lookm")
        engine_input = await self._render_with_context(request)
        prompt_tokens = len(engine_input["prompt_token_ids"])
        extra_args = {LOOKM_REQUEST_KEY: {"enabled": False}} if request.lookm is False else None
        compression = self._compression_counts(engine_input, request, extra_args)
        params = self._sampling_params(request.sampling, prompt_tokens, extra_args)
        completion_tokens = 0
        retrieval = request.retrieval.info if request.retrieval else None
        try:
            async for output in self._llm.generate(engine_input, params, request.request_id):
                for choice in output.outputs:
                    completion_tokens += len(choice.token_ids)
                    yield GenerationDelta(
                        index=choice.index,
                        text=choice.text,
                        finish_reason=choice.finish_reason,
                        prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens,
                        retrieval=retrieval,
                        compression=compression,
                        logprobs=_token_logprobs(choice, params.logprobs) if params.logprobs is not None else None,
                    )
                    retrieval = None
        except Exception as exc:
            raise _as_openai_error(exc) from exc

    async def _render_with_context(self, request: GenerationRequest) -> dict[str, Any]:
        """Engine input for the chat, with any retrieved chunks inserted within what the context leaves.

        The budget counts the context text; the chat template adds framing around it, so while the
        prompt would still overflow, the budget shrinks by the overflow and the messages are rebuilt.
        Counting uses the tokenizer on the rendered text plus the image tokens measured on the bare
        prompt, so vLLM processes the images of a request once per rendering that it keeps.
        """
        bare_text = self._chat_text(request.messages)
        retrieval = request.retrieval
        if retrieval is None or not retrieval.chunks:
            return await self._render(bare_text, request.images, request.aim_keep_ratio)
        for chunk in retrieval.chunks:  # a document must not smuggle an image slot into the prompt
            for token in self._placeholders:
                chunk.text = chunk.text.replace(token, "")
        bare = await self._render(bare_text, request.images, request.aim_keep_ratio)
        image_tokens = len(bare["prompt_token_ids"]) - self._count(bare_text)
        max_tokens = request.sampling.max_tokens
        reserve = max_tokens if max_tokens is not None else COMPLETION_RESERVE_TOKENS
        text_rag = self._config.retrieval.text_rag
        budget = text_rag_budget(
            text_rag.max_context_tokens, self.max_model_len, len(bare["prompt_token_ids"]), max_tokens
        )
        tokenizer = self._llm.get_tokenizer()
        xrag = retrieval.info.mode == "xrag"
        # xRAG: each chunk is the one placeholder token in the text RAG layout; its vector goes alongside.
        in_prompt = as_xrag_placeholders(retrieval) if xrag else retrieval
        for _ in range(_MAX_FIT_ATTEMPTS):
            text = self._chat_text(build_text_rag_messages(request.messages, in_prompt, tokenizer, budget, text_rag))
            overflow = self._count(text) + image_tokens + reserve - self.max_model_len
            if overflow <= 0 or budget == 0:
                break
            budget = max(0, budget - overflow)
        vectors = None
        if xrag:
            used = text.count(XRAG_TOKEN)
            vectors = np.asarray([chunk.vector for chunk in retrieval.chunks[:used]], dtype=np.float32)
        return await self._render(text, request.images, request.aim_keep_ratio, vectors)

    def _chat_text(self, messages: list[dict[str, Any]]) -> str:
        try:
            return self._llm.get_tokenizer().apply_chat_template(
                messages, chat_template=self._chat_template, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja errors: a message shape the template does not accept
            raise InvalidRequestError(f"the chat template rejected the messages: {exc}", param="messages") from exc

    def _count(self, text: str) -> int:
        return len(self._llm.get_tokenizer()(text)["input_ids"])

    async def _render(
        self, text: str, images: list[Any], aim_keep_ratio: float | None = None, vectors: np.ndarray | None = None
    ) -> dict[str, Any]:
        prompt: dict[str, Any] = {"prompt": text}
        if vectors is not None and len(vectors):
            prompt["multi_modal_data"] = {"retrieval": vectors}
        if images:
            prompt["multi_modal_data"] = {**prompt.get("multi_modal_data", {}), "image": images}
            if self._aim:
                # Always explicit: the ratio is then part of every image's hash (processor, encoder and
                # prefix caches), whatever the deployment default.
                ratio = self._config.compression.aim_keep_ratio if aim_keep_ratio is None else aim_keep_ratio
                prompt["mm_processor_kwargs"] = {KEEP_RATIO_KEY: ratio}
        try:
            (engine_input,) = await self._llm.renderer.render_cmpl_async([prompt])
        except AssertionError as exc:  # vLLM asserts placeholder/item agreement while processing input
            raise InvalidRequestError(f"the images do not match their placeholders: {exc}", param="messages") from exc
        except Exception as exc:
            raise _as_openai_error(exc) from exc
        return engine_input

    def _compression_counts(
        self, engine_input: dict[str, Any], request: GenerationRequest, extra_args: dict[str, Any] | None
    ) -> CompressionCounts | None:
        """Image placeholders in the prompt and unmerged; prompt KV entries and how many LOOK-M keeps.

        The kept count comes from the rule the scheduler and the worker apply to the same prompt
        (:func:`~mmrag.serving.vllm_plugin.lookm.budget.plan_compaction`): one fresh prefill per prompt,
        which the deployment guarantees by turning chunked prefill off.
        """
        if not request.images:
            return None
        spans = [(p.offset, p.length) for p in engine_input.get("mm_placeholders", {}).get("image", [])]
        after = sum(length for _, length in spans)
        info = self._llm.renderer.get_mm_processor().info
        before = after  # stock vLLM class: no merge
        if hasattr(info, "get_full_image_tokens"):
            before = sum(
                info.get_full_image_tokens(image_width=image.width, image_height=image.height)
                for image in request.images
            )
        prompt_len = len(engine_input["prompt_token_ids"])
        plan = plan_compaction(
            self._lookm,
            prompt_len=prompt_len,
            num_scheduled=prompt_len,
            num_computed_before=0,
            num_output_tokens=0,
            spans=spans,
            extra_args=extra_args,
        )
        kept = plan.kept if plan else prompt_len
        return CompressionCounts(visual_before=before, visual_after=after, kv_prompt=prompt_len, kv_kept=kept)

    def _reject_placeholder_text(self, messages: list[dict[str, Any]]) -> None:
        """A literal ``<image>`` in user text would become an image slot with no image behind it."""
        for i, message in enumerate(messages):
            content = message["content"]
            texts = [content] if isinstance(content, str) else [p.get("text", "") for p in content]
            for text in texts:
                for token in self._placeholders:
                    if token in text:
                        raise InvalidRequestError(
                            f"messages[{i}] contains the reserved placeholder {token!r}",
                            param=f"messages[{i}].content",
                        )

    def _sampling_params(
        self, options: SamplingOptions, prompt_tokens: int, extra_args: dict[str, Any] | None = None
    ) -> SamplingParams:
        room = self.max_model_len - prompt_tokens
        if room < 1:
            raise InvalidRequestError(
                f"the prompt is {prompt_tokens} tokens, which leaves no room in the model's context of "
                f"{self.max_model_len} tokens; shorten the messages",
                param="messages",
                code="context_length_exceeded",
            )
        max_tokens = options.max_tokens if options.max_tokens is not None else room
        if max_tokens > room:
            raise InvalidRequestError(
                f"max_tokens={max_tokens} plus the prompt's {prompt_tokens} tokens exceeds the model's "
                f"context of {self.max_model_len} tokens (at most {room} completion tokens fit)",
                param="max_tokens",
                code="context_length_exceeded",
            )
        try:
            return self._build_sampling_params(options, max_tokens, extra_args)
        except Exception as exc:
            raise _as_openai_error(exc) from exc

    @staticmethod
    def _build_sampling_params(
        options: SamplingOptions, max_tokens: int, extra_args: dict[str, Any] | None
    ) -> SamplingParams:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=options.n,
            max_tokens=max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            stop=list(options.stop) or None,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            logprobs=options.logprobs,
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra_args,
        )

    async def check_health(self) -> None:
        if self._llm is None:
            raise EngineUnavailableError("the engine has not started")
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineUnavailableError(f"the engine is not healthy: {exc}") from exc

    def metrics_text(self) -> str:
        from prometheus_client import REGISTRY, generate_latest

        return generate_latest(REGISTRY).decode()

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None


def _token_logprobs(choice: Any, top_k: int) -> tuple[TokenLogprob, ...]:
    """vLLM's per-position ``{token_id: Logprob}`` (the top ``top_k`` plus the sampled token) as ours."""
    out = []
    for token_id, position in zip(choice.token_ids, choice.logprobs or (), strict=True):
        sampled = position[token_id]
        # The sampled token is in the dict even when it ranks below top_k; OpenAI's list holds exactly k.
        ranked = sorted(
            (lp for lp in position.values() if lp.rank is not None and lp.rank <= top_k),
            key=operator.attrgetter("rank"),
        )
        top = tuple((lp.decoded_token or "", lp.logprob) for lp in ranked)
        out.append(TokenLogprob(sampled.decoded_token or "", sampled.logprob, top))
    return tuple(out)


def placeholder_tokens(tokenizer: Any) -> list[str]:
    """Special tokens that stand for another modality (``<image>``, ``<xrag>``), not BOS/EOS/pad/unk."""
    markers = {getattr(tokenizer, n, None) for n in ("bos_token", "eos_token", "pad_token", "unk_token")}
    specials = [t for t in tokenizer.all_special_tokens if t not in markers]
    return specials + [XRAG_TOKEN] * (XRAG_TOKEN not in specials)


def as_xrag_placeholders(result: RetrievalResult) -> RetrievalResult:
    """The result with each chunk's text replaced by the placeholder (same ``info``: it records what fit)."""
    chunks = [chunk.model_copy(update={"text": XRAG_TOKEN}) for chunk in result.chunks]
    return RetrievalResult(chunks=chunks, info=result.info)


# Rebuilding a text-RAG prompt converges in one retry in practice; more would mean a template bug.
_MAX_FIT_ATTEMPTS = 3

# vLLM's names for what it validates -> the chat request field a client must change.
_REQUEST_FIELD = {"input_tokens": "messages", "max_output_tokens": "max_tokens", "prompt": "messages"}


def _as_openai_error(exc: Exception) -> Exception:
    """vLLM's validation errors become 400s naming the field; a dead engine becomes a 503."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, InvalidRequestError | EngineUnavailableError):
        return exc
    if isinstance(exc, EngineDeadError):
        return EngineUnavailableError(f"the engine died: {exc}")
    if isinstance(exc, VLLMValidationError):
        parameter = getattr(exc, "parameter", None) or "input_tokens"
        return InvalidRequestError(str(exc), param=_REQUEST_FIELD.get(parameter, parameter))
    if isinstance(exc, ValueError | TypeError):
        return InvalidRequestError(str(exc), param="messages")
    return exc
