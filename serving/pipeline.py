"""The chat pipeline: validate -> fetch images -> retrieve (image hits: their files join the images) -> (engine:
build the prompt once, generate) -> usage.

One sequence for every way in: the HTTP app (:mod:`mmrag.serving.openai.server`) and ``mmrag batch``
(in-process and on Ray Data, :mod:`mmrag.serving.batch`) are thin adapters over :class:`ChatPipeline`, so a
batch line gets the answer, or the error, the server would give. The stages behind it are reached through
a :class:`ChatBackend`: Serve deployment handles in the server, an in-process engine and retriever in batch
jobs and tests.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

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
from mmrag.serving.media import ImagePolicy, decode_image_bytes, load_images
from mmrag.serving.models.registry import model_reads_images
from mmrag.serving.offload import Offload
from mmrag.serving.openai import chat
from mmrag.serving.openai.completions_protocol import CompletionRequest
from mmrag.serving.openai.constraints import check_request_schemas
from mmrag.serving.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    CompressionOptions,
    ImagePart,
    TextPart,
    VideoPart,
    format_error_location,
    json_object,
    new_completion_id,
    now,
    validated,
)
from mmrag.serving.openai.structured import escaped_json_deltas, structured_output
from mmrag.serving.openai.tool_parsing import ToolCallParsing
from mmrag.serving.openai.tools import ToolPlan, plan_tools, template_tool_fields, tool_call_deltas
from mmrag.serving.retrieval.errors import RetrievalError
from mmrag.serving.retrieval.protocol import (
    RetrievalOptions,
    RetrievalResult,
    insert_retrieved_images,
    query_text_from_messages,
    resolve_options,
)
from mmrag.serving.vector_stores.access import with_owner
from mmrag.serving.video import VideoPolicy, load_videos, model_reads_video

if TYPE_CHECKING:
    from mmrag.serving.retrieval.retriever import Embeddings

logger = logging.getLogger(__name__)

__all__ = ["ChatBackend", "ChatPipeline", "LocalBackend", "PreparedChat", "compression_settings", "parse_chat_body"]


# Bodies up to this size are parsed on the event loop: that takes microseconds, less than a thread hop.
INLINE_PARSE_BYTES = 16 * 1024


class ChatBackend(Protocol):
    """The stages behind the pipeline."""

    async def retrieve(self, options: RetrievalOptions | None, query_text: str) -> RetrievalResult: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]: ...

    async def embed(self, texts: list[str], *, model: str, dimensions: int | None = None) -> Embeddings:
        """``/v1/embeddings``: the retriever's encoder embeds ``texts`` (it checks ``model`` and ``dimensions``)."""
        ...

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

    async def embed(self, texts: list[str], *, model: str, dimensions: int | None = None) -> Embeddings:
        embed = getattr(self.retriever, "embed", None)  # a Retriever, or a stage that serves embeddings
        if embed is None:  # permanent for this server (a 404, as for a route it lacks), not a 503 to retry
            raise NotFoundError(
                "embeddings are not served here: they are the retriever's, and this server runs none",
                code="embeddings_unavailable",
            )
        return await embed(texts, model=model, dimensions=dimensions)

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
    tools: ToolPlan | None = None  # how the output is read as tool calls (None: no tools)


class ChatPipeline:
    def __init__(self, config: MmragConfig, backend: ChatBackend):
        self.config = config
        self.backend = backend
        self.offload = Offload(config.limits.worker_threads)
        self._files: Any = None  # the Files API's store, opened by the first retrieved image (FileStore)
        parser = config.model.tool_call_parser  # tool_choice auto: loads in the background from now on
        self.tool_parsing = ToolCallParsing(parser, config.model) if parser is not None else None

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

    async def prepare(self, request: ChatCompletionRequest, owner: str | None = None) -> PreparedChat:
        """Limits, images and retrieval: everything before the engine, the cheap checks first (a request
        refused for its size costs no image fetch and no search). ``owner``: the request's key id on a server
        with API keys (it searches only that key's vector stores), None on an open one."""
        completion_id = new_completion_id()
        check_limits(request, self.config)
        tools = plan_tools(request, self.config.model.tool_call_parser)
        images = await self._load_images(request)
        generation = GenerationRequest(
            request_id=completion_id,
            messages=[template_message(m) for m in request.messages],
            images=images,
            videos=await self._load_videos(request, pixels_used=sum(i.width * i.height for i in images)),
            sampling=sampling_options(request, tools),
            compression=compression_settings(request.compression, self.config.compression),
            tools=tools.prompt_tools if tools else None,
        )
        if tools is not None and tools.mode == "auto" and self.tool_parsing is not None:
            generation.sampling = await self.tool_parsing.sampling(tools.prompt_tools or [], generation.sampling)
        generation.retrieval = await self._retrieve(request, generation, owner)
        stores = request.retrieval.vector_store_ids if request.retrieval is not None else None
        if stores and generation.retrieval is not None and generation.retrieval.chunks:  # image files: stores only
            await self._show_retrieved_images(generation)
        return PreparedChat(completion_id, request, generation, tools)

    def generate(self, prepared: PreparedChat) -> AsyncIterator[GenerationDelta]:
        deltas = self.backend.generate(prepared.generation)
        tools = prepared.tools
        if tools is not None and tools.mode in ("named", "required"):
            return tool_call_deltas(deltas, tools)
        structured = prepared.generation.sampling.structured
        if structured and structured.kind in ("json", "json_object"):
            deltas = escaped_json_deltas(deltas)
        if tools is not None and tools.mode == "auto" and self.tool_parsing is not None:
            request = prepared.request
            parallel = request.parallel_tool_calls is not False
            return self.tool_parsing.deltas(deltas, tools.prompt_tools or [], stream=request.stream, parallel=parallel)
        return deltas

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

    async def _load_videos(self, request: ChatCompletionRequest, pixels_used: int) -> list[Any]:
        """The request's videos as vLLM's video items, within what its images left of the pixel budget."""
        video_urls = [
            (f"messages[{i}].content[{j}].video_url.url", part.video_url.url)
            for i, message in enumerate(request.messages)
            if isinstance(message.content, list)
            for j, part in enumerate(message.content)
            if isinstance(part, VideoPart)
        ]
        if not video_urls:
            return []
        policy = VideoPolicy.from_limits(self.config.limits)
        return await load_videos(video_urls, policy, self.offload, pixels_used=pixels_used)

    async def _retrieve(
        self, request: ChatCompletionRequest, generation: GenerationRequest, owner: str | None = None
    ) -> RetrievalResult | None:
        """Run the retrieval stage when the request (or the server default) asks for it."""
        try:
            if resolve_options(request.retrieval, self.config.retrieval).mode == "none":
                return None
            # Cut before it crosses to the retriever: a 5 MB message must not cost 5 MB of encoding and BM25.
            query = query_text_from_messages(generation.messages, self.config.retrieval.max_query_chars)
            return await self.backend.retrieve(with_owner(request.retrieval, owner), query)
        except RetrievalError as exc:
            raise retrieval_error_as_openai(exc) from exc

    async def _show_retrieved_images(self, generation: GenerationRequest) -> None:
        """Image hits (vector-store image files) leave the text chunks and enter the prompt as images.

        The retriever returns file ids, not bytes: the files are read here from the Files API's store (the
        same ``files.directory`` its routes use), then checked and decoded as the request's own images are,
        against what the request's images left of its budgets (``limits.max_images_per_request``, the pixel
        budget) and at most ``vector_stores.max_retrieved_images``, best hits first, if they match well enough
        (``vector_stores.min_image_score``). A hit that is not shown (a text-only model, a weak match, a limit,
        a file gone or too large) is no error: its document says why.
        """
        result = generation.retrieval
        assert result is not None
        hits = [c for c in result.chunks if c.metadata.get("kind") == "image" and c.metadata.get("file_id")]
        if not hits:
            return
        result.chunks = [c for c in result.chunks if c.metadata.get("kind") != "image"]
        result.image_chunks = hits
        documents = {d.id: d for d in result.info.documents}
        for hit in hits:
            if hit.id in documents:
                documents[hit.id].kind = "image"
        limits = self.config.limits
        room = min(
            self.config.vector_stores.max_retrieved_images, limits.max_images_per_request - len(generation.images)
        )
        dropped: dict[str, str] = {}
        queue: list[Any] = []
        if not model_reads_images(self.config.model.name, self.config.model.path):
            dropped = {hit.id: f"the served model ({self.config.model.served_name}) reads text only" for hit in hits}
        else:
            floor = self.config.vector_stores.min_image_score
            if result.info.hybrid or self.config.retrieval.index.metric == "L2":
                floor = None  # RRF ranks and distances are not similarities
            files: set[str] = set()
            for hit in hits:  # one store's file may be in another store named too
                if hit.metadata["file_id"] in files:
                    dropped[hit.id] = "the same file as a better hit"
                elif floor is not None and hit.score < floor:
                    dropped[hit.id] = f"a weak match: score {hit.score:.3f} < {floor:g} (vector_stores.min_image_score)"
                else:
                    files.add(hit.metadata["file_id"])
                    queue.append(hit)
        shown: list[tuple[Any, Any]] = []
        policy = ImagePolicy.from_limits(limits)
        pixels = sum(image.width * image.height for image in generation.images)
        while queue and len(shown) < room:  # a hit that cannot be shown gives its place to the next one
            batch, queue = queue[: room - len(shown)], queue[room - len(shown) :]
            blobs = [await self.offload.run(self._read_file, hit.metadata["file_id"], policy) for hit in batch]
            ready = [(hit, blob) for hit, blob in zip(batch, blobs, strict=True) if isinstance(blob, bytes)]
            dropped |= {hit.id: blob for hit, blob in zip(batch, blobs, strict=True) if isinstance(blob, str)}
            images = await decode_image_bytes(
                [(hit.metadata["file_id"], blob) for hit, blob in ready], policy, self.offload, pixels_used=pixels
            )
            for (hit, _), image in zip(ready, images, strict=True):
                if isinstance(image, OpenAIError):
                    dropped[hit.id] = image.message
                else:
                    shown.append((hit, image))
                    pixels += image.width * image.height
        limit = (
            f"over the request's image limit: at most {self.config.vector_stores.max_retrieved_images} retrieved "
            f"(vector_stores.max_retrieved_images) and {limits.max_images_per_request} in all with the request's "
            "own (limits.max_images_per_request)"
        )
        dropped |= {hit.id: limit for hit in queue}
        for hit_id, reason in dropped.items():
            if hit_id in documents:
                documents[hit_id].image_dropped = reason
        result.info.context_images = len(shown)
        if not shown:
            return
        captions = [f"Retrieved image (source: {_caption_name(hit.source)}):" for hit, _ in shown]
        generation.messages, at = insert_retrieved_images(generation.messages, captions)
        generation.images[at:at] = [image for _, image in shown]

    def _read_file(self, file_id: str, policy: ImagePolicy) -> bytes | str:
        """A retrieved image file's bytes (at most one over the image size limit), or why it cannot be read.
        Blocking: run it off the event loop."""
        if self._files is None:
            from mmrag.serving.files.store import FileStore

            self._files = FileStore(self.config.files)  # mkdir and a sweep: not at start, nor on the event loop
        try:
            _, handle = self._files.open(file_id)
            with handle:
                return handle.read(policy.max_bytes + 1)
        except NotFoundError:
            return "the file no longer exists"
        except OSError as exc:
            logger.warning("retrieved image file %s unreadable: %s", file_id, exc)
            return f"the file could not be read ({type(exc).__name__})"


def _caption_name(name: str) -> str:
    """A file name fit for the prompt's text: no characters of a chat-template token (``<image>``,
    ``<|im_start|>``, ``[INST]``), which the engine refuses in message text, and not long."""
    cleaned = re.sub(r"[<>\[\]|{}]", "", name).strip()
    return cleaned[:100] or "image"


def parse_chat_body(body: bytes, limits: LimitsConfig | None = None) -> ChatCompletionRequest:
    """Parse and validate a body; ``limits`` (default: the defaults) bound what validation may build."""
    payload = json_object(body)
    if _SURROGATE_ESCAPE.search(body):
        reject_lone_surrogates(payload)
    request = validated(ChatCompletionRequest, payload, limits)
    check_request_schemas(request, limits or LimitsConfig())
    return request


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
    check_videos(request, config)
    check_prompt_chars(request, config)


def check_videos(request: ChatCompletionRequest, config: MmragConfig) -> None:
    """Before anything is fetched: the served model takes video, and the request sends no more than allowed."""
    videos = [
        f"messages[{i}].content[{j}].video_url"
        for i, message in enumerate(request.messages)
        if isinstance(message.content, list)
        for j, part in enumerate(message.content)
        if isinstance(part, VideoPart)
    ]
    if not videos:
        return
    if not model_reads_video(config.model.name, config.model.path):
        raise InvalidRequestError(
            f"the served model ({config.model.served_name}) does not take video input; send no video_url parts",
            param=videos[0],
        )
    limit = config.limits.max_videos_per_request
    if len(videos) > limit:
        raise InvalidRequestError(
            f"{len(videos)} videos in the request; at most {limit} are accepted (limits.max_videos_per_request)",
            param=videos[limit],
        )


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
    """OpenAI message -> chat-template message (``image_url`` parts become bare ``{"type": "image"}``,
    ``video_url`` parts ``{"type": "video"}``)."""
    role = "system" if message.role == "developer" else message.role
    if not isinstance(message.content, list):
        return {"role": role, "content": message.content or "", **template_tool_fields(message)}
    parts = [
        {"type": "image"}
        if isinstance(p, ImagePart)
        else {"type": "video"}
        if isinstance(p, VideoPart)
        else {"type": "text", "text": p.text}
        for p in message.content
    ]
    return {"role": role, "content": parts, **template_tool_fields(message)}


def sampling_options(
    request: ChatCompletionRequest | CompletionRequest, tools: ToolPlan | None = None
) -> SamplingOptions:
    """A chat's or a legacy completion's sampling (the fields they share mean the same). Chat: a forced tool
    call's constraint wins over response_format (never both: a 400). Completions: ``logprobs`` is the count of
    alternatives, and with ``echo`` the prompt's tokens are scored too."""
    if isinstance(request, ChatCompletionRequest):
        max_tokens = request.completion_limit
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        structured = (tools.structured if tools else None) or structured_output(request)
        prompt_logprobs = None
    else:
        max_tokens, logprobs, structured = request.max_tokens, request.logprobs, None
        prompt_logprobs = request.logprobs if request.echo else None
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=tuple(request.stop or ()),
        n=request.n,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logprobs=logprobs,
        structured=structured,
        logit_bias=tuple((int(k), v) for k, v in (request.logit_bias or {}).items()),
        min_p=request.min_p,
        top_k=request.top_k,
        repetition_penalty=request.repetition_penalty,
        prompt_logprobs=prompt_logprobs,
    )
