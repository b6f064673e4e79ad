"""The :class:`Engine` backed by vLLM's ``AsyncLLM`` (V1), owned by this process: generation and usage.

We own the engine rather than sit behind vLLM's OpenAI server because the chain renders the chat
itself: images are fetched by our guarded loader (never by vLLM), and later stages insert retrieved
documents and per-request compression settings as multimodal data and sampling extras, which vLLM's chat
endpoint cannot carry. Engine arguments come from :mod:`.args`, the prompt from :mod:`.prompt`. Pinned to
vLLM 0.32: ``AsyncLLM.renderer`` is how 0.32 turns a prompt into engine input.
"""

from __future__ import annotations

import logging
import operator
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.args import aim_enabled, build_engine_args
from mmrag.serving.engine.prompt import PromptBuilder, load_chat_template, video_tokens
from mmrag.serving.engine.protocol import (
    CompressionCounts,
    CompressionSettings,
    Engine,
    GenerationDelta,
    GenerationRequest,
    SamplingOptions,
    StructuredOutput,
    TokenLogprob,
)
from mmrag.serving.errors import EngineUnavailableError, InvalidRequestError
from mmrag.serving.metrics import engine_stat_loggers
from mmrag.serving.vllm_plugin.kv.plan import VISUAL_MODALITIES, plan_compaction, request_extra_args

if TYPE_CHECKING:
    from vllm import SamplingParams

logger = logging.getLogger(__name__)


class VllmEngine(Engine):
    def __init__(self, config: MmragConfig, model_path: str):
        self._config = config
        self._model_path = model_path
        self._llm: Any = None
        self._prompts: PromptBuilder | None = None
        self._aim = False
        self._kv_compaction = config.compression.lookm.enabled

    async def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        # The CPU backend sizes its KV cache from this variable; unset, it may not fit one NUMA node.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self._config.engine.kv_cache_space_gib))
        chat_template = load_chat_template(self._model_path)
        self._aim = aim_enabled(self._config, self._model_path)
        self._llm = AsyncLLM.from_engine_args(
            structured_outputs_config(build_engine_args(self._config, self._model_path), self._config),
            stat_loggers=engine_stat_loggers(),  # in a Serve replica, vLLM's metrics also reach Ray's port
        )
        self._prompts = PromptBuilder(self._llm, chat_template, self._config, self._aim)
        logger.info("vLLM engine started", extra={"model": self._model_path})

    @property
    def max_model_len(self) -> int:
        return self._config.engine.max_model_len

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        self._check_compression(request.compression)
        assert self._prompts is not None, "the engine has not started"
        try:
            engine_input = await self._prompts.engine_input(request)
        except Exception as exc:
            raise _as_openai_error(exc) from exc
        prompt_tokens = len(engine_input["prompt_token_ids"])
        extra_args = request_extra_args(request.compression.kv) if self._kv_compaction else None
        compression = self._compression_counts(engine_input, request)
        params = self._sampling_params(request.sampling, prompt_tokens, extra_args)
        completion_tokens = 0
        retrieval = request.retrieval.info if request.retrieval else None
        token_ids = request.sampling.return_token_ids
        prompt_logprobs = None  # the first output carries them; each choice's first delta repeats them
        unseen = set(range(request.sampling.n)) if params.prompt_logprobs is not None else set()
        try:
            async for output in self._llm.generate(engine_input, params, request.request_id):
                if unseen and prompt_logprobs is None and output.prompt_logprobs is not None:
                    prompt_logprobs = self._prompt_logprobs(output, params.prompt_logprobs)
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
                        token_ids=tuple(choice.token_ids) if token_ids else None,
                        prompt_logprobs=prompt_logprobs if choice.index in unseen else None,
                    )
                    unseen.discard(choice.index)
                    retrieval = None
        except Exception as exc:
            raise _as_openai_error(exc, request.sampling.structured) from exc

    def _check_compression(self, settings: CompressionSettings) -> None:
        """What the request asks for must be something this deployment runs."""
        if settings.aim_keep_ratio < 1.0 and not self._aim:
            raise InvalidRequestError(
                "AIM compression is not enabled for this deployment's model", param="compression.aim_keep_ratio"
            )
        if settings.kv is not None and not self._kv_compaction:
            raise InvalidRequestError(
                f"KV compaction ({settings.kv.name}) is not enabled on this deployment (compression.lookm.enabled)",
                param="compression.kv",
            )

    def _compression_counts(self, engine_input: dict[str, Any], request: GenerationRequest) -> CompressionCounts | None:
        """Image (and video) placeholders in the prompt and unmerged; prompt KV entries and how many the KV
        method keeps.

        The kept count comes from the rule the scheduler and the worker apply to the same prompt
        (:func:`~mmrag.serving.vllm_plugin.kv.plan.plan_compaction`): one fresh prefill per prompt, which
        the deployment guarantees by turning chunked prefill off.
        """
        if not request.images and not request.videos:
            return None
        placeholders = engine_input.get("mm_placeholders", {})
        spans = [(p.offset, p.length) for modality in VISUAL_MODALITIES for p in placeholders.get(modality, [])]
        after = sum(length for _, length in spans)
        info = self._llm.renderer.get_mm_processor().info
        before = after  # stock vLLM class: no merge
        if hasattr(info, "get_full_image_tokens"):
            before = sum(
                info.get_full_image_tokens(image_width=image.width, image_height=image.height)
                for image in request.images
            )
            before += sum(video_tokens(info, frames, None) for frames, _ in request.videos)
        prompt_len = len(engine_input["prompt_token_ids"])
        method = request.compression.kv if self._kv_compaction else None
        plan = plan_compaction(method, prompt_len=prompt_len, spans=spans)
        kept = plan.kept if plan else prompt_len
        return CompressionCounts(visual_before=before, visual_after=after, kv_prompt=prompt_len, kv_kept=kept)

    def _prompt_logprobs(self, output: Any, top_k: int) -> tuple[TokenLogprob, ...]:
        """vLLM's per-prompt-position ``{token_id: Logprob}`` (None first) as ours; the first token, which has
        no log-probability (NaN), is named by the tokenizer."""
        ids = list(output.prompt_token_ids or ())
        if not ids:
            return ()
        first = TokenLogprob(self._llm.get_tokenizer().decode(ids[:1]), float("nan"))
        positions = list(output.prompt_logprobs or ())[1:]
        return (first, *(_position_logprob(i, p, top_k) for i, p in zip(ids[1:], positions, strict=True)))

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
            structured_outputs=_structured_outputs_params(options.structured),
            logit_bias=dict(options.logit_bias) or None,
            min_p=options.min_p,
            top_k=options.top_k,
            repetition_penalty=options.repetition_penalty,
            skip_special_tokens=options.skip_special_tokens,
            prompt_logprobs=options.prompt_logprobs,
        )

    async def check_health(self) -> None:
        if self._llm is None:
            raise EngineUnavailableError("the engine has not started")
        try:
            await self._llm.check_health()
        except Exception as exc:
            logger.warning("engine health check failed: %s", exc)
            raise EngineUnavailableError("the engine is not healthy") from exc

    def metrics_text(self) -> str:
        from prometheus_client import REGISTRY, generate_latest

        return generate_latest(REGISTRY).decode()

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None


def structured_outputs_config(args: Any, config: MmragConfig) -> Any:
    """``args`` with the configured structured-output backend and whitespace rule, unless ``engine_kwargs``
    set ``structured_outputs_config`` itself (that one wins, whole)."""
    from vllm.config import StructuredOutputsConfig

    if "structured_outputs_config" not in config.engine.engine_kwargs:
        args.structured_outputs_config = StructuredOutputsConfig(
            backend=config.engine.structured_outputs_backend, disable_any_whitespace=config.engine.compact_json
        )
    return args


def _structured_outputs_params(structured: StructuredOutput | None) -> Any:
    """Our constraint as vLLM's ``StructuredOutputsParams`` (the backend is the engine's, chosen at start)."""
    if structured is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if structured.kind == "json":
        return StructuredOutputsParams(json=structured.spec)
    if structured.kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if structured.kind == "choice":
        return StructuredOutputsParams(choice=list(structured.choices))
    if structured.kind == "regex":
        return StructuredOutputsParams(regex=structured.spec)
    return StructuredOutputsParams(grammar=structured.spec)


def _token_logprobs(choice: Any, top_k: int) -> tuple[TokenLogprob, ...]:
    """vLLM's per-position ``{token_id: Logprob}`` (the top ``top_k`` plus the sampled token) as ours."""
    return tuple(
        _position_logprob(token_id, position, top_k)
        for token_id, position in zip(choice.token_ids, choice.logprobs or (), strict=True)
    )


def _position_logprob(token_id: int, position: dict[int, Any], top_k: int) -> TokenLogprob:
    sampled = position[token_id]
    # The sampled token is in the dict even when it ranks below top_k; OpenAI's list holds exactly k.
    ranked = sorted(
        (lp for lp in position.values() if lp.rank is not None and lp.rank <= top_k),
        key=operator.attrgetter("rank"),
    )
    top = tuple((lp.decoded_token or "", lp.logprob) for lp in ranked)
    return TokenLogprob(sampled.decoded_token or "", sampled.logprob, top)


# vLLM's names for what it validates -> the chat request field a client must change.
_REQUEST_FIELD = {"input_tokens": "messages", "max_output_tokens": "max_tokens", "prompt": "messages"}


def _as_openai_error(exc: Exception, structured: StructuredOutput | None = None) -> Exception:
    """vLLM's validation errors become 400s naming the field; a dead engine becomes a 503. A refusal that names
    no parameter, of a constrained request, is the structured-output backend's: it names the constraint's field."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, InvalidRequestError | EngineUnavailableError):
        return exc
    if isinstance(exc, EngineDeadError):
        logger.error("the engine died: %s", exc)
        return EngineUnavailableError("the engine died; it is being restarted")
    if isinstance(exc, VLLMValidationError):
        parameter = getattr(exc, "parameter", None)
        if parameter is None and structured is not None:
            return InvalidRequestError(f"{structured.param}: {exc}", param=structured.param)
        parameter = parameter or "input_tokens"
        return InvalidRequestError(str(exc), param=_REQUEST_FIELD.get(parameter, parameter))
    if isinstance(exc, ValueError | TypeError):
        return InvalidRequestError(str(exc), param="messages")
    return exc
