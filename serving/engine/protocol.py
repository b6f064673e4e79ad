"""The contract between the serving chain and a text generator, so deployments are testable without vLLM.

An :class:`Engine` takes a fully prepared chat (messages in chat-template form, decoded images, sampling
options) and yields :class:`GenerationDelta` objects: the new text of one choice, and once per choice a
finish reason. Invalid input is raised as :class:`~mmrag.serving.errors.OpenAIError` *before* the
first delta, so callers can answer it with a clean 4xx even when streaming.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image

from mmrag.serving.retrieval.protocol import RetrievalInfo, RetrievalResult

if TYPE_CHECKING:
    from mmrag.kernels.methods.base import KVMethod


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the answer (vLLM's structured outputs): ``kind`` json (``spec``: a JSON schema's text),
    json_object, regex (``spec``), choice (``choices``) or grammar (``spec``). ``param``: the request field
    that asked for it, which a backend's refusal names."""

    kind: Literal["json", "json_object", "regex", "choice", "grammar"]
    spec: str | None = None
    choices: tuple[str, ...] = ()
    param: str = "response_format"


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # None: no log-probabilities; k >= 0: each sampled token's, with the k most likely alternatives.
    logprobs: int | None = None
    # None: free text; else the answer is constrained (response_format, a forced tool call).
    structured: StructuredOutput | None = None
    # (token id, bias) pairs; ids are checked against the vocabulary by the engine.
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_p: float = 0.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    # False keeps special tokens in the text: a tool-call parser may need the markers its model writes as such.
    skip_special_tokens: bool = True
    # True: each delta carries its token ids (some tool-call parsers read markers by id as they stream).
    return_token_ids: bool = False
    # None: no prompt log-probabilities; k >= 0: each prompt token's, with the k most likely (legacy ``echo``).
    prompt_logprobs: int | None = None


@dataclass(frozen=True)
class CompressionSettings:
    """A request's compression, parsed once from the request and the deployment's defaults
    (:func:`mmrag.serving.pipeline.compression_settings`) and carried unchanged to vLLM's processes.

    ``aim_keep_ratio``: share of each image's visual tokens kept by AIM's merge (1: no merge).
    ``kv``: the KV method that compacts the prompt's cache after prefill (:mod:`mmrag.kernels.methods`);
    None keeps the whole cache.
    """

    aim_keep_ratio: float = 1.0
    kv: KVMethod | None = None


@dataclass
class GenerationRequest:
    """One chat, ready for the model.

    ``messages`` are in the form chat templates take: ``content`` is a string or a list of
    ``{"type": "text", "text": ...}`` / ``{"type": "image"}`` parts; ``images`` holds the decoded images
    in the order their parts appear, ``videos`` the decoded videos as vLLM's video items (``(frames, metadata)``:
    a ``(T, H, W, 3)`` uint8 RGB array and the metadata of :func:`mmrag.serving.video.decode_video`), behind
    ``{"type": "video"}`` parts. ``prompt`` (legacy completions) is a raw text prompt instead: sent to
    the model as it is, with no chat template, images or retrieval (``messages`` is then empty).
    """

    request_id: str
    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    videos: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    # Text RAG: the engine inserts these chunks into the prompt, within what its context leaves free.
    retrieval: RetrievalResult | None = None
    compression: CompressionSettings = field(default_factory=CompressionSettings)
    # Function tools the model is shown (``{"type": "function", "function": {...}}``); None: none.
    tools: list[dict[str, Any]] | None = None
    prompt: str | None = None


@dataclass(frozen=True)
class CompressionCounts:
    """What compression did to a prompt with images.

    ``visual_before`` / ``visual_after``: image placeholder tokens unmerged and as the model read them
    (AIM). ``kv_prompt`` / ``kv_kept``: prompt entries in each layer's KV cache after prefill, and how
    many stay after LOOK-M's compaction (equal when the request is not compacted).
    """

    visual_before: int
    visual_after: int
    kv_prompt: int
    kv_kept: int


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability, with the most likely tokens at its position (best first)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ToolCallChunk:
    """A piece of one tool call of a choice: the first piece of call ``index`` carries its ``id`` and
    ``name``, later pieces only more ``arguments`` text."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class GenerationDelta:
    """New output of one choice. Token counts are cumulative for the request so far."""

    index: int
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    # Set on the first delta of a request that retrieved: what was found and what entered the prompt.
    retrieval: RetrievalInfo | None = None
    # Set on every delta of a request with images (like the token counts).
    compression: CompressionCounts | None = None
    # One entry per token of ``text`` when the request asked for log-probabilities.
    logprobs: tuple[TokenLogprob, ...] | None = None
    # None: a text answer. A tuple (empty while a call is still being read): a tool-call answer, whose pieces
    # of calls these are (the output they were read from is not in ``text``).
    tool_calls: tuple[ToolCallChunk, ...] | None = None
    # The ids of ``text``'s tokens, when ``SamplingOptions.return_token_ids`` asked for them.
    token_ids: tuple[int, ...] | None = None
    # On a choice's first delta, when ``SamplingOptions.prompt_logprobs`` asked: one entry per prompt token; the
    # first's log-probability is NaN (nothing precedes it, so the model gives it none).
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


# With no max_tokens in the request, text RAG leaves at least this many tokens for the answer.
COMPLETION_RESERVE_TOKENS = 256


def text_rag_budget(max_context_tokens: int, max_model_len: int, prompt_tokens: int, max_tokens: int | None) -> int:
    """Tokens the retrieved context may take: the configured cap, or what the context window leaves."""
    reserve = max_tokens if max_tokens is not None else COMPLETION_RESERVE_TOKENS
    return max(0, min(max_context_tokens, max_model_len - prompt_tokens - reserve))


class Engine(abc.ABC):
    """A chat generator hosted in one process (a Serve replica, a batch worker, a test)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model; returns when the engine can serve."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream deltas of every choice; cancelling the iteration aborts the request in the engine."""

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Context length (prompt + completion tokens)."""

    def metrics_text(self) -> str:
        """Prometheus exposition of the engine's own metrics ('' if it has none)."""
        return ""

    async def shutdown(self) -> None:  # noqa: B027 - optional hook, most engines hold nothing
        """Release the model; the default has nothing to release."""


# The engine every server and batch job runs unless told otherwise (tests name a fake one).
DEFAULT_ENGINE = "mmrag.serving.engine.vllm_engine:VllmEngine"


def load_engine_class(import_path: str) -> type[Engine]:
    """``"module:Class"`` -> the :class:`Engine` subclass (imported only now: vLLM loads only where it runs)."""
    module, _, name = import_path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise TypeError(f"{import_path} is not an Engine subclass")
    return cls
