"""A chat, its images and its retrieved documents as one vLLM engine input, rendered once (or a legacy
completions prompt, rendered as it is).

Retrieved chunks go into the prompt within what the context leaves (text RAG), or as one ``<xrag>`` token
each with the chunk's vector beside it (xRAG). The budget counts tokens of the chat text plus the image
tokens vLLM will expand the placeholders to (from the processor's own count, so the images are processed
once, in the single render at the end).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.protocol import COMPLETION_RESERVE_TOKENS, GenerationRequest, text_rag_budget
from mmrag.serving.engine.tool_prompt import reject_special_tool_text, render_tools
from mmrag.serving.errors import InvalidRequestError
from mmrag.serving.retrieval.config import TextRagConfig
from mmrag.serving.retrieval.protocol import RetrievalResult, build_text_rag_messages
from mmrag.serving.vllm_plugin.aim import KEEP_RATIO_KEY, aim_kept_tokens
from mmrag.serving.xrag.projector import XRAG_TOKEN, read_card

__all__ = [
    "PromptBuilder",
    "as_xrag_placeholders",
    "load_chat_template",
    "modality_tokens",
    "placeholder_tokens",
    "special_tokens",
    "xrag_layout",
]

# Rebuilding a text-RAG prompt converges in one retry in practice; more would mean a template bug.
_MAX_FIT_ATTEMPTS = 3


class PromptBuilder:
    """Chat template + tokenizer + vLLM's renderer of one engine."""

    def __init__(self, llm: Any, chat_template: str, config: MmragConfig, aim: bool):
        self._llm = llm
        self._tokenizer = llm.get_tokenizer()
        self._chat_template = chat_template
        self._config = config
        self._aim = aim
        self.placeholders = placeholder_tokens(self._tokenizer)
        self.specials = special_tokens(self._tokenizer)
        self.modality_tokens = modality_tokens(self._tokenizer, getattr(llm.model_config, "hf_config", None))
        self.accepts_images = bool(llm.model_config.is_multimodal_model)
        self.accepts_videos = self.accepts_images and "video" in supported_modalities(llm)
        self.xrag_layout = xrag_layout(config)

    async def engine_input(self, request: GenerationRequest) -> dict[str, Any]:
        """The rendered engine input (``prompt_token_ids``, multimodal data and placeholders)."""
        if request.prompt is not None:
            return await self._raw_prompt_input(request)
        self.reject_special_text(request.messages)
        reject_special_tool_text(request.messages, request.tools, self.specials)
        if request.images and not self.accepts_images:
            raise InvalidRequestError(
                f"the served model ({self._config.model.served_name}) reads text only; send no image_url parts",
                param="messages",
            )
        if request.videos and not self.accepts_videos:
            raise InvalidRequestError(
                f"the served model ({self._config.model.served_name}) does not take video input; send no "
                "video_url parts",
                param="messages",
            )
        retrieval = request.retrieval
        if retrieval is None or not retrieval.chunks:
            return await self._render(self.chat_text(request.messages, request.tools), request)
        text, vectors = self._fit_context(request, retrieval)
        return await self._render(text, request, vectors)

    async def _raw_prompt_input(self, request: GenerationRequest) -> dict[str, Any]:
        """A completions prompt as it is: no chat template, no images, no retrieval. Chat markers and EOS are
        the client's to write (it owns the whole prompt); a modality placeholder is not, as it would be an
        image or document slot with nothing behind it. The prompt must leave room for one token at least."""
        assert request.prompt is not None
        token = first_special_token(request.prompt, self.modality_tokens)
        if token is not None:
            raise InvalidRequestError(f"prompt contains the model's reserved placeholder {token!r}", param="prompt")
        try:
            engine_input = await self._render(request.prompt, request)
        except Exception as exc:  # vLLM's own length check while rendering names its "input_tokens"
            if getattr(exc, "parameter", None) != "input_tokens":
                raise
            raise InvalidRequestError(str(exc), param="prompt", code="context_length_exceeded") from exc
        prompt_tokens, max_model_len = len(engine_input["prompt_token_ids"]), self._config.engine.max_model_len
        if prompt_tokens >= max_model_len:
            raise InvalidRequestError(
                f"the prompt is {prompt_tokens} tokens, which leaves no room in the model's context of "
                f"{max_model_len} tokens; shorten the prompt",
                param="prompt",
                code="context_length_exceeded",
            )
        return engine_input

    def _fit_context(self, request: GenerationRequest, retrieval: RetrievalResult) -> tuple[str, np.ndarray | None]:
        """The chat text with as many retrieved chunks as fit, and xRAG's vectors for those that went in.

        The budget counts the context text; the chat template adds framing around it, so while the prompt
        would still overflow, the budget shrinks by the overflow and the messages are rebuilt.
        """
        for chunk in retrieval.chunks:  # a document must not smuggle an image slot or a chat turn into the prompt
            chunk.text = strip_special_tokens(chunk.text, self.specials)
        max_model_len = self._config.engine.max_model_len
        image_surplus = self._image_token_surplus(request)
        bare_tokens = self._count(self.chat_text(request.messages, request.tools)) + image_surplus
        max_tokens = request.sampling.max_tokens
        text_rag = self._config.retrieval.text_rag
        budget = text_rag_budget(text_rag.max_context_tokens, max_model_len, bare_tokens, max_tokens)
        reserve = max_tokens if max_tokens is not None else COMPLETION_RESERVE_TOKENS
        xrag = retrieval.info.mode == "xrag"
        # xRAG: each chunk is the one placeholder token, in the layout its projector was trained in (the
        # card's: text RAG's, or a lean one without source lines); its vector goes alongside.
        in_prompt = as_xrag_placeholders(retrieval) if xrag else retrieval
        layout = self.xrag_layout if xrag else text_rag
        for _ in range(_MAX_FIT_ATTEMPTS):
            messages = build_text_rag_messages(request.messages, in_prompt, self._tokenizer, budget, layout)
            text = self.chat_text(messages, request.tools)
            overflow = self._count(text) + image_surplus + reserve - max_model_len
            if overflow <= 0 or budget == 0:
                break
            budget = max(0, budget - overflow)
        if not xrag:
            return text, None
        used = text.count(XRAG_TOKEN)
        return text, np.asarray([chunk.vector for chunk in retrieval.chunks[:used]], dtype=np.float32)

    def _image_token_surplus(self, request: GenerationRequest) -> int:
        """Tokens vLLM adds to the text's by expanding each one-token image (and video) placeholder (after
        AIM's merge)."""
        if not request.images and not request.videos:
            return 0
        info = self._llm.renderer.get_mm_processor().info
        ratio = {"keep_ratio": request.compression.aim_keep_ratio} if self._aim else {}
        expanded = sum(
            info.get_num_image_tokens(image_width=image.width, image_height=image.height, **ratio)
            for image in request.images
        )
        keep = request.compression.aim_keep_ratio if self._aim else None
        expanded += sum(video_tokens(info, frames, keep) for frames, _ in request.videos)
        return expanded - len(request.images) - len(request.videos)

    def chat_text(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        messages, tools = render_tools(messages, tools, self._chat_template)
        try:
            return self._tokenizer.apply_chat_template(
                messages, chat_template=self._chat_template, tools=tools, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja errors: a message shape the template does not accept
            raise InvalidRequestError(f"the chat template rejected the messages: {exc}", param="messages") from exc

    def _count(self, text: str) -> int:
        return len(self._tokenizer(text)["input_ids"])

    async def _render(self, text: str, request: GenerationRequest, vectors: np.ndarray | None = None) -> dict[str, Any]:
        prompt: dict[str, Any] = {"prompt": text}
        if vectors is not None and len(vectors):
            prompt["multi_modal_data"] = {"retrieval": vectors}
        if request.images:
            prompt["multi_modal_data"] = {**prompt.get("multi_modal_data", {}), "image": request.images}
        if request.videos:
            prompt["multi_modal_data"] = {**prompt.get("multi_modal_data", {}), "video": request.videos}
        if (request.images or request.videos) and self._aim:
            # Always explicit: the ratio is then part of every image's hash (processor, encoder and
            # prefix caches), whatever the deployment default.
            prompt["mm_processor_kwargs"] = {KEEP_RATIO_KEY: request.compression.aim_keep_ratio}
        if request.videos:
            # The frames were sampled at the ingress: the processor takes each one as given.
            prompt["mm_processor_kwargs"] = {**prompt.get("mm_processor_kwargs", {}), "do_sample_frames": False}
        try:
            (engine_input,) = await self._llm.renderer.render_cmpl_async([prompt])
        except AssertionError as exc:  # vLLM asserts placeholder/item agreement while processing input
            raise InvalidRequestError(f"the images do not match their placeholders: {exc}", param="messages") from exc
        return engine_input

    def reject_special_text(self, messages: list[dict[str, Any]]) -> None:
        """Message text must not contain the tokenizer's special tokens: the prompt is rendered as text and
        tokenized with special tokens parsed, so a typed ``<image>`` would become an image slot with no image
        behind it, and a typed ``</s>`` or ``<|im_start|>`` would end or open a chat turn the client forged."""
        for i, message in enumerate(messages):
            content = message["content"]
            texts = [content] if isinstance(content, str) else [p.get("text", "") for p in content]
            for text in texts:
                token = first_special_token(text, self.specials)
                if token is not None:
                    kind = "placeholder" if token in self.placeholders else "special token"
                    raise InvalidRequestError(
                        f"messages[{i}] contains the tokenizer's reserved {kind} {token!r}",
                        param=f"messages[{i}].content",
                    )


def supported_modalities(llm: Any) -> set[str]:
    """The input modalities the engine's model takes (``image``, ``video``, ...)."""
    try:
        return set(llm.renderer.get_mm_processor().info.get_supported_mm_limits())
    except Exception:  # a model with no multimodal processor
        return set()


def video_tokens(info: Any, frames: Any, keep_ratio: float | None) -> int:
    """Placeholder tokens a video's ``(T, H, W, 3)`` frames expand to: the processor's stock count, or with
    AIM (``keep_ratio``) each temporal patch's tokens merged to ``ceil(tokens x ratio)``, as the plugin does."""
    num_frames, height, width = frames.shape[:3]
    processor = info.get_image_processor()
    full = info.get_num_video_tokens(
        image_width=width, image_height=height, num_frames=num_frames, image_processor=processor, mm_kwargs={}
    )
    if keep_ratio is None:
        return full
    steps = -(-num_frames // info.get_hf_config().vision_config.temporal_patch_size)
    return steps * aim_kept_tokens(full // steps, keep_ratio)


def placeholder_tokens(tokenizer: Any) -> list[str]:
    """Special tokens that stand for another modality (``<image>``, ``<xrag>``), not BOS/EOS/pad/unk."""
    markers = {getattr(tokenizer, n, None) for n in ("bos_token", "eos_token", "pad_token", "unk_token")}
    specials = [t for t in tokenizer.all_special_tokens if t not in markers]
    return specials + [XRAG_TOKEN] * (XRAG_TOKEN not in specials)


def modality_tokens(tokenizer: Any, hf_config: Any) -> list[str]:
    """The tokens that stand for an image or a document (``<image>``, ``<xrag>``): the config's image token,
    and xRAG's placeholder."""
    tokens = [XRAG_TOKEN]
    image_id = getattr(hf_config, "image_token_index", None) or getattr(hf_config, "image_token_id", None)
    if isinstance(image_id, int):
        tokens.append(tokenizer.convert_ids_to_tokens(image_id))
    return sorted((t for t in dict.fromkeys(tokens) if t), key=lambda t: (-len(t), t))


def special_tokens(tokenizer: Any) -> list[str]:
    """Every string the tokenizer turns into a special token (BOS/EOS/pad/unk, chat markers such as
    ``<|im_start|>``, modality placeholders), longest first so that stripping removes a whole token before any
    shorter one inside it."""
    tokens = set(tokenizer.all_special_tokens)
    # Added tokens flagged special (Llama 3's header markers) are not always among ``all_special_tokens``.
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens.update(t.content for t in added.values() if getattr(t, "special", False))
    tokens.add(XRAG_TOKEN)
    return sorted((t for t in tokens if t), key=lambda t: (-len(t), t))


def first_special_token(text: str, specials: list[str]) -> str | None:
    return next((token for token in specials if token in text), None)


def strip_special_tokens(text: str, specials: list[str]) -> str:
    """``text`` without any special token, repeated until none is left (removing one may join another)."""
    while (token := first_special_token(text, specials)) is not None:
        text = text.replace(token, "")
    return text


def xrag_layout(config: MmragConfig) -> TextRagConfig:
    """How xRAG documents enter the prompt: text RAG's settings with the fields the configured projector
    was trained with (its card's ``layout``); text RAG's own when no projector is configured."""
    text_rag = config.retrieval.text_rag
    if config.retrieval.xrag.projector is None:
        return text_rag
    return read_card(config.retrieval.xrag.projector).prompt_layout(text_rag)


def as_xrag_placeholders(result: RetrievalResult) -> RetrievalResult:
    """The result with each chunk's text replaced by the placeholder (same ``info``: it records what fit)."""
    chunks = [chunk.model_copy(update={"text": XRAG_TOKEN}) for chunk in result.chunks]
    return RetrievalResult(chunks=chunks, info=result.info)


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
