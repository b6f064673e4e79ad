"""The chat pipeline: validate -> fetch images -> retrieve -> (engine: build the prompt once, generate) -> usage.

One sequence for every way in: the HTTP app (:mod:`mmrag.serving.openai.server`) and ``mmrag batch``
(in-process and on Ray Data, :mod:`mmrag.serving.batch`) are thin adapters over :class:`ChatPipeline`, so a
batch line gets the answer, or the error, the server would give. The stages behind it are reached through
a :class:`ChatBackend`: Serve deployment handles in the server, an in-process engine and retriever in batch
jobs and tests.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from mmrag.serving.config import CompressionConfig, LimitsConfig, MmragConfig
from mmrag.serving.engine.protocol import (
    CompressionSettings,
    Engine,
    GenerationDelta,
    GenerationRequest,
    SamplingOptions,
)
from mmrag.serving.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    OpenAIError,
    PayloadTooLargeError,
    ServiceUnavailableError,
)
from mmrag.serving.media import ImagePolicy, load_images
from mmrag.serving.offload import Offload
from mmrag.serving.openai import chat
from mmrag.serving.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    CompressionOptions,
    ImagePart,
    TextPart,
    format_error_location,
    new_completion_id,
    now,
)
from mmrag.serving.retrieval.errors import RetrievalError
from mmrag.serving.retrieval.protocol import (
    RetrievalOptions,
    RetrievalResult,
    query_text_from_messages,
    resolve_options,
)

logger = logging.getLogger(__name__)

__all__ = ["ChatBackend", "ChatPipeline", "LocalBackend", "PreparedChat", "compression_settings", "parse_chat_body"]


# Bodies up to this size are parsed on the event loop: that takes microseconds, less than a thread hop.
INLINE_PARSE_BYTES = 16 * 1024


class ChatBackend(Protocol):
    """The stages behind the pipeline."""

    async def retrieve(self, options: RetrievalOptions | None, query_text: str) -> RetrievalResult: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]: ...

    async def check_health(self) -> None: ...

    async def engine_metrics(self) -> str: ...


class LocalBackend:
    """A backend over an engine in this process (batch jobs, tests); ``engine`` None for a stage that only
    prepares (the retrieval pool of a Ray batch)."""

    def __init__(self, engine: Engine | None, retriever: Any = None):
        self.engine = engine
        self.retriever = retriever  # anything with ``async retrieve(options, query_text)``

    async def retrieve(self, options: RetrievalOptions | None, query_text: str) -> RetrievalResult:
        if self.retriever is None:
            raise ServiceUnavailableError("retrieval is not configured on this server", param="retrieval")
        return await self.retriever.retrieve(options, query_text)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        assert self.engine is not None, "this backend only prepares"
        return self.engine.generate(request)

    async def check_health(self) -> None:
        assert self.engine is not None, "this backend only prepares"
        await self.engine.check_health()

    async def engine_metrics(self) -> str:
        return self.engine.metrics_text() if self.engine is not None else ""


@dataclass
class PreparedChat:
    """A validated chat with its images and documents, ready for the engine (what crosses from the
    retrieval pool to the LLM pool of a Ray batch)."""

    completion_id: str
    request: ChatCompletionRequest
    generation: GenerationRequest


class ChatPipeline:
    def __init__(self, config: MmragConfig, backend: ChatBackend):
        self.config = config
        self.backend = backend
        self.offload = Offload(config.limits.worker_threads)

    def parse(self, body: bytes) -> ChatCompletionRequest:
        """A request body (bytes, as received) -> a validated request; over-size bodies are refused first."""
        limit = self.config.limits.max_request_bytes
        if len(body) > limit:
            raise PayloadTooLargeError(f"request body larger than {limit} bytes")
        return parse_chat_body(body, self.config.limits)

    async def parse_off_loop(self, body: bytes) -> ChatCompletionRequest:
        """:meth:`parse`, in a worker thread when the body is large enough to stall the event loop."""
        if len(body) <= INLINE_PARSE_BYTES:
            return self.parse(body)
        return await self.offload.run(self.parse, body)

    async def prepare(self, request: ChatCompletionRequest) -> PreparedChat:
        """Limits, images and retrieval: everything before the engine, the cheap checks first (a request
        refused for its size costs no image fetch and no search)."""
        completion_id = new_completion_id()
        check_limits(request, self.config)
        generation = GenerationRequest(
            request_id=completion_id,
            messages=[template_message(m) for m in request.messages],
            images=await self._load_images(request),
            sampling=sampling_options(request),
            compression=compression_settings(request.compression, self.config.compression),
        )
        generation.retrieval = await self._retrieve(request, generation)
        return PreparedChat(completion_id, request, generation)

    def generate(self, prepared: PreparedChat) -> AsyncIterator[GenerationDelta]:
        return self.backend.generate(prepared.generation)

    async def complete(
        self, prepared: PreparedChat, deltas: AsyncIterator[GenerationDelta] | None = None
    ) -> ChatCompletion:
        """The whole completion (``deltas``: the generation's stream, when the caller observes it)."""
        return await chat.collect_completion(
            deltas if deltas is not None else self.generate(prepared),
            n=prepared.request.n,
            completion_id=prepared.completion_id,
            created=now(),
            model=prepared.request.model,
        )

    async def _load_images(self, request: ChatCompletionRequest) -> list[Any]:
        image_urls = [
            (f"messages[{i}].content[{j}].image_url.url", part.image_url.url)
            for i, message in enumerate(request.messages)
            if isinstance(message.content, list)
            for j, part in enumerate(message.content)
            if isinstance(part, ImagePart)
        ]
        return await load_images(image_urls, ImagePolicy.from_limits(self.config.limits), self.offload)

    async def _retrieve(self, request: ChatCompletionRequest, generation: GenerationRequest) -> RetrievalResult | None:
        """Run the retrieval stage when the request (or the server default) asks for it."""
        try:
            if resolve_options(request.retrieval, self.config.retrieval).mode == "none":
                return None
            # Cut before it crosses to the retriever: a 5 MB message must not cost 5 MB of encoding and BM25.
            query = query_text_from_messages(generation.messages, self.config.retrieval.max_query_chars)
            return await self.backend.retrieve(request.retrieval, query)
        except RetrievalError as exc:
            raise retrieval_error_as_openai(exc) from exc


def parse_chat_body(body: bytes, limits: LimitsConfig | None = None) -> ChatCompletionRequest:
    """Parse and validate a body; ``limits`` (default: the defaults) bound what validation may build."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # the decoder recurses per nesting level: ~1000 levels is a client's doing
        raise InvalidRequestError("the request body is nested too deeply") from exc
    if not isinstance(payload, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(body):
        reject_lone_surrogates(payload)
    try:
        return ChatCompletionRequest.model_validate(payload, context={"limits": limits})
    except RecursionError as exc:  # validators that walk a nested value (compression.kv) hit the same bound
        raise InvalidRequestError("the request body is nested too deeply") from exc
    except ValidationError as exc:
        # The deepest location is the most specific one when a union reports every branch.
        error = max(exc.errors(), key=lambda e: len(e["loc"]))
        param = format_error_location(error["loc"])
        raise InvalidRequestError(f"{param}: {error['msg']}", param=param or None) from exc


# JSON can only carry a lone surrogate as an escape (raw ones are invalid UTF-8, refused by the decoder).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def reject_lone_surrogates(payload: dict[str, Any]) -> None:
    """A string holding a lone surrogate (``"\\ud800"`` unpaired) is a 400 naming its field: UTF-8 cannot
    encode it, so the tokenizer, the encoder or gRPC would fail on it deep inside (a pair is one character
    once decoded, and passes)."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), payload)]
    while stack:  # iterative: the payload may be as deep as the JSON decoder allowed
        loc, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                param = format_error_location(loc) or None
                raise InvalidRequestError(f"{param}: not valid Unicode (a lone surrogate)", param=param) from None
        elif isinstance(value, dict):
            stack.extend(((*loc, key), item) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend(((*loc, i), item) for i, item in reversed(list(enumerate(value))))


def retrieval_error_as_openai(exc: RetrievalError) -> OpenAIError:
    """The client's error for a retrieval failure: its 4xx as said, a fault as a 503 that names only its kind
    (the full message, with the store's address or file, goes to the log)."""
    param = exc.field or "retrieval"
    if exc.status_code == 404:
        return NotFoundError(exc.public_message, param=param, code="collection_not_found")
    if exc.status_code < 500:
        return InvalidRequestError(exc.public_message, param=param)
    logger.warning("retrieval unavailable: %s", exc.message)
    return ServiceUnavailableError(f"retrieval unavailable: {exc.public_message}", param=param)


def check_limits(request: ChatCompletionRequest, config: MmragConfig) -> None:
    limits = config.limits
    if request.model != config.model.served_name:
        raise ModelNotFoundError(request.model)
    if len(request.messages) > limits.max_messages:
        raise InvalidRequestError(f"at most {limits.max_messages} messages per request", param="messages")
    if request.n > limits.max_n:
        raise InvalidRequestError(f"n must be at most {limits.max_n}", param="n")
    if request.n > 1 and request.temperature == 0:
        raise InvalidRequestError("n > 1 needs temperature > 0 (greedy choices would be equal)", param="n")
    cap = limits.max_completion_tokens
    if cap is not None and (request.completion_limit or 0) > cap:
        field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise InvalidRequestError(f"{field} must be at most {cap}", param=field)
    num_images = sum(
        isinstance(p, ImagePart) for m in request.messages if isinstance(m.content, list) for p in m.content
    )
    if num_images > limits.max_images_per_request:
        raise InvalidRequestError(
            f"{num_images} images in the request; at most {limits.max_images_per_request} are accepted",
            param="messages",
        )
    check_prompt_chars(request, config)


# No tokenizer averages more characters per token over a whole prompt (English text: about 4).
CHARS_PER_TOKEN_BOUND = 16


def check_prompt_chars(request: ChatCompletionRequest, config: MmragConfig) -> None:
    """Refuse, before images and retrieval, message text too long to fit the context in any tokenization
    (the exact token count is the engine's, after retrieval: too late to spare the search)."""
    limit = config.limits.max_prompt_chars or CHARS_PER_TOKEN_BOUND * config.engine.max_model_len
    chars = sum(len(text) for message in request.messages for text in message_texts(message))
    if chars > limit:
        raise InvalidRequestError(
            f"{chars} characters of message text; at most {limit} fit this server's context "
            f"({config.engine.max_model_len} tokens)",
            param="messages",
        )


def message_texts(message: ChatMessage) -> list[str]:
    if isinstance(message.content, str):
        return [message.content]
    return [part.text for part in message.content or () if isinstance(part, TextPart)]


def compression_settings(options: CompressionOptions | None, config: CompressionConfig) -> CompressionSettings:
    """The request's compression over the deployment's defaults, parsed once for the whole path.

    ``kv`` names a method (``none`` keeps the whole cache); ``lookm: false`` opts out as ``none`` does, and
    ``lookm: true`` asks for the deployment's LOOK-M. Whether the deployment runs what is asked is the
    engine's check (it knows its model).
    """
    ratio = config.aim_keep_ratio
    kv = config.lookm.settings() if config.lookm.enabled else None
    if options is not None:
        ratio = options.aim_keep_ratio if options.aim_keep_ratio is not None else ratio
        if options.kv is not None:
            kv = options.kv_method
        elif options.lookm is not None:
            kv = config.lookm.settings() if options.lookm else None
    return CompressionSettings(aim_keep_ratio=ratio, kv=kv)


def template_message(message: ChatMessage) -> dict[str, Any]:
    """OpenAI message -> chat-template message (``image_url`` parts become bare ``{"type": "image"}``)."""
    role = "system" if message.role == "developer" else message.role
    if not isinstance(message.content, list):
        return {"role": role, "content": message.content or ""}
    parts = [
        {"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text} for p in message.content
    ]
    return {"role": role, "content": parts}


def sampling_options(request: ChatCompletionRequest) -> SamplingOptions:
    return SamplingOptions(
        max_tokens=request.completion_limit,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=tuple(request.stop or ()),
        n=request.n,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
    )
