"""OpenAI chat-completions request and response shapes (the subset mmrag serves, validated strictly).

Unknown top-level fields are ignored, as OpenAI-compatible servers do, except OpenAI's own fields that would
change the answer and that mmrag does not implement (``audio``, ``functions``, ``verbosity``, ...): ignoring
those would return a 200 that is not what the client asked for, so they are a 400 naming the field. OpenAI
fields that ask for nothing the answer shows (``user``, ``metadata``, ``service_tier``, ``prediction``, ...)
are typed, bounded and accepted as no-ops (see docs/usage.md). Everything mmrag reads is typed and
range-checked here, so a bad value is a 400 naming the field before any work starts; tool definitions and
``response_format`` schemas are checked in :mod:`.tools` and :mod:`.structured`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Collection
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from mmrag.serving.config import LimitsConfig
from mmrag.serving.errors import InvalidRequestError, clip
from mmrag.serving.retrieval.protocol import RetrievalInfo, RetrievalOptions

_DEFAULT_LIMITS = LimitsConfig()

# OpenAI chat fields that change what the answer is and that mmrag does not implement. They are declared
# (hidden from the OpenAPI document) only to be refused by name. ``functions`` / ``function_call`` are the
# deprecated form of ``tools`` / ``tool_choice`` (use those); ``reasoning_effort`` and ``verbosity`` steer
# reasoning models (OpenAI refuses them for others too); ``moderation`` and ``web_search_options`` ask for
# services mmrag does not run; ``audio`` and ``modalities`` other than text ask for audio output.
UNSUPPORTED_REQUEST_FIELDS = (
    "functions",
    "function_call",
    "audio",
    "modalities",
    "moderation",
    "reasoning_effort",
    "verbosity",
    "web_search_options",
)
UNSUPPORTED_MESSAGE_FIELDS = ("function_call", "audio")


def refuse_unsupported(value: Any, info: ValidationInfo) -> Any:
    """A set unsupported field is a 400 naming it; null, an empty list or object, and ``modalities``
    ``["text"]`` ask for nothing beyond what mmrag does, so some clients' defaults still pass."""
    if value is None or value == [] or value == {} or (info.field_name == "modalities" and value == ["text"]):
        return value
    raise ValueError(f"`{info.field_name}` is not supported by this server")


_Unsupported = SkipJsonSchema[Any]

# OpenAI's rule for function and response-format names.
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Part):
    type: Literal["text"]
    text: str


class ImageURL(_Part):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Part):
    url: str = Field(min_length=1, description="A data: URL (data:video/mp4;base64,...) or an http(s) URL.")


class VideoPart(_Part):
    """A video (vLLM's OpenAI server's ``video_url`` part): frames sampled up to ``limits.max_video_frames``."""

    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    """A call the assistant made, as the client sends it back in the history."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(description="The call's arguments: JSON text, as the server returned them.")


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = Field(default=None, description="assistant messages: calls it made.")
    tool_call_id: str | None = Field(
        default=None, min_length=1, max_length=256, description="tool messages: the call this is the result of."
    )
    function_call: _Unsupported = None
    audio: _Unsupported = None

    _refuse_unsupported = field_validator(*UNSUPPORTED_MESSAGE_FIELDS)(refuse_unsupported)

    @model_validator(mode="after")
    def _images_only_from_users(self) -> ChatMessage:
        media = (
            [p.type for p in self.content if isinstance(p, ImagePart | VideoPart)]
            if isinstance(self.content, list)
            else []
        )
        if media and self.role != "user":
            raise ValueError(f"{media[0]} parts are only accepted in user messages, not {self.role}")
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls are only accepted in assistant messages, not {self.role}")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message needs tool_call_id, and only tool messages take one")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class CompressionOptions(BaseModel):
    """mmrag extension: per-request compression settings (unset fields: the deployment's defaults)."""

    model_config = ConfigDict(extra="forbid")

    aim_keep_ratio: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Share of each image's visual tokens kept (AIM merge)."
    )
    lookm: bool | None = Field(
        default=None,
        description="false: keep this request's whole KV cache on a deployment that runs LOOK-M "
        "(true asks for it, a 400 where the deployment does not run it).",
    )
    kv: dict[str, Any] | None = Field(
        default=None,
        description='The KV method that compacts this prompt\'s cache after prefill: {"method": NAME, ...its '
        "settings}, NAME one of the registered methods (lookm, random, recent, scores) or none.",
    )

    @field_validator("kv")
    @classmethod
    def _known_method(cls, kv: dict[str, Any] | None) -> dict[str, Any] | None:
        """Unknown methods, unknown settings and bad values are a 400 naming ``compression.kv``."""
        from mmrag.kernels.methods import kv_method_from_dict

        if kv is not None:
            if not isinstance(kv.get("method"), str):
                raise ValueError('needs "method": the name of a registered KV method, or "none"')
            kv_method_from_dict(kv)
        return kv

    @property
    def kv_method(self) -> Any:
        """The :class:`~mmrag.kernels.methods.base.KVMethod` that ``kv`` names (None for ``none``)."""
        from mmrag.kernels.methods import kv_method_from_dict

        return None if self.kv is None else kv_method_from_dict(self.kv)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=NAME_PATTERN, description="Letters, digits, _ and -; at most 64 characters.")
    description: str | None = Field(default=None, max_length=8192)
    parameters: dict[str, Any] | None = Field(
        default=None, description="A JSON schema of the arguments object (absent: no arguments)."
    )
    strict: bool | None = Field(default=None, description="Accepted; forced calls always follow the schema.")


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = Field(description="Only function tools are served.")
    function: FunctionDefinition


class ToolChoiceFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: ToolChoiceFunction


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = Field(default=None, max_length=8192)
    json_schema: dict[str, Any] | None = Field(
        default=None, alias="schema", description="The JSON schema the answer follows (absent: any JSON object)."
    )
    strict: bool | None = Field(default=None, description="Accepted; the answer always follows the schema.")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class StructuredOutputsOptions(BaseModel):
    """vLLM's extra (``structured_outputs`` in the body): constrain the answer to exactly one of these."""

    model_config = ConfigDict(extra="forbid")

    json_schema: dict[str, Any] | None = Field(default=None, alias="json", description="A JSON schema.")
    regex: str | None = Field(default=None, min_length=1, description="A regular expression.")
    choice: list[str] | None = Field(default=None, min_length=1, max_length=1024, description="One of these.")
    grammar: str | None = Field(default=None, min_length=1, description="An EBNF / Lark grammar.")

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputsOptions:
        if sum(v is not None for v in (self.json_schema, self.regex, self.choice, self.grammar)) != 1:
            raise ValueError("set exactly one of json, regex, choice, grammar")
        return self


class SamplingExtras(BaseModel):
    """OpenAI's ``logit_bias`` and vLLM's sampling extras, top-level as vLLM's own server takes them: chat's and
    legacy completions' alike."""

    model_config = ConfigDict(extra="ignore")

    logit_bias: dict[str, float] | None = Field(
        default=None, description="Token id (as a string) -> bias added to its logit, in [-100, 100]."
    )
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, description="vLLM: drop tokens below min_p x the top one's.")
    top_k: int = Field(default=0, ge=-1, description="vLLM: sample from the k most likely tokens (0 or -1: all).")
    repetition_penalty: float = Field(
        default=1.0, gt=0.0, le=10.0, description="vLLM: > 1 discourages tokens already in the prompt or answer."
    )

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_and_bias_range(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        return check_logit_bias(bias)


class ChatCompletionRequest(SamplingExtras):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # mmrag extension (the openai client sends it in extra_body): retrieval from Milvus for this chat.
    retrieval: RetrievalOptions | None = None
    # mmrag extension: per-request compression (AIM keep ratio), overriding the deployment default.
    compression: CompressionOptions | None = None
    # Structured outputs and tool calls (see mmrag.serving.openai.structured and .tools).
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    structured_outputs: StructuredOutputsOptions | None = Field(
        default=None, description="vLLM: constrain the answer to a JSON schema, regex, choice or grammar."
    )
    # OpenAI fields accepted as no-ops: they ask for nothing the answer shows (bounded as OpenAI bounds them).
    user: str | None = Field(default=None, max_length=512)
    safety_identifier: str | None = Field(default=None, max_length=512)
    prompt_cache_key: str | None = Field(default=None, max_length=512)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    metadata: dict[str, str] | None = Field(default=None, description="At most 16 pairs; keys 64, values 512 chars.")
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    store: bool | None = Field(default=None, description="false or null: this server stores no completions.")
    prediction: dict[str, Any] | None = Field(
        default=None, description="A latency hint only (the answer does not depend on it): accepted, unused."
    )
    # OpenAI fields mmrag does not implement (see UNSUPPORTED_REQUEST_FIELDS): a 400 when set.
    functions: _Unsupported = None
    function_call: _Unsupported = None
    audio: _Unsupported = None
    modalities: _Unsupported = None
    moderation: _Unsupported = None
    reasoning_effort: _Unsupported = None
    verbosity: _Unsupported = None
    web_search_options: _Unsupported = None

    _refuse_unsupported = field_validator(*UNSUPPORTED_REQUEST_FIELDS)(refuse_unsupported)

    @field_validator("messages", mode="before")
    @classmethod
    def _counted_before_validation(cls, messages: Any, info: ValidationInfo) -> Any:
        """Messages and content parts are counted before any is validated: a body of a million parts is
        refused for the price of counting them, not of building a million models."""
        if not isinstance(messages, list):
            return messages
        limits = validation_limits(info)
        if len(messages) > limits.max_messages:
            raise ValueError(f"{len(messages)} messages; at most {limits.max_messages} per request")
        parts = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list))
        # Tool calls in the history count as parts: each is a model too.
        parts += sum(
            len(m["tool_calls"]) for m in messages if isinstance(m, dict) and isinstance(m.get("tool_calls"), list)
        )
        if parts > limits.max_content_parts:
            raise ValueError(f"{parts} content parts in all; at most {limits.max_content_parts} per request")
        return messages

    @field_validator("tools", mode="before")
    @classmethod
    def _tools_counted_before_validation(cls, tools: Any, info: ValidationInfo) -> Any:
        limit = validation_limits(info).max_tools
        if isinstance(tools, list) and len(tools) > limit:
            raise ValueError(f"{len(tools)} tools; at most {limit} per request")
        return tools

    @field_validator("metadata")
    @classmethod
    def _metadata_bounds(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is not None:
            if len(metadata) > 16:
                raise ValueError("at most 16 key-value pairs")
            if any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
                raise ValueError("keys are at most 64 characters, values at most 512")
        return metadata

    @field_validator("store")
    @classmethod
    def _nothing_stored(cls, store: bool | None) -> bool | None:
        if store:
            raise ValueError("this server does not store completions; send false or leave it out")
        return store

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str]:
        return stop_sequences(stop)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs=true")
        return top

    @property
    def completion_limit(self) -> int | None:
        """``max_completion_tokens`` wins over the deprecated ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


# OpenAI's own bound on the entries of ``logit_bias``.
MAX_LOGIT_BIAS = 300


def check_logit_bias(bias: dict[str, float] | None) -> dict[str, float] | None:
    """Keys are token ids (the engine checks them against its vocabulary); values in [-100, 100]."""
    if bias is None:
        return None
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"{len(bias)} entries; at most {MAX_LOGIT_BIAS}")
    for key, value in bias.items():
        if not key.isascii() or not key.isdigit() or len(key) > 9:
            raise ValueError(f"keys are token ids (non-negative integers), not {clip(key)}")
        if not -100.0 <= value <= 100.0:
            raise ValueError(f"token {key}: bias {value} is outside [-100, 100]")
    return bias


def stop_sequences(stop: str | list[str] | None) -> list[str]:
    """OpenAI's ``stop`` (a string or up to 4 non-empty strings) as a list."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise ValueError("at most 4 stop sequences")
    if any(not s for s in stops):
        raise ValueError("stop sequences must be non-empty")
    return stops


def validation_limits(info: ValidationInfo) -> LimitsConfig:
    """The server's limits, passed as ``context={"limits": ...}``; the defaults when validating without."""
    return (info.context or {}).get("limits") or _DEFAULT_LIMITS


# ---------------------------------------------------------------------------------------------------
# Responses


class CompressionUsage(BaseModel):
    """mmrag extension of ``usage``: what AIM merging and LOOK-M compaction did to the request's prompt."""

    visual_tokens_before: int = Field(description="Placeholder tokens the images would take unmerged.")
    visual_tokens_after: int = Field(description="Placeholder tokens the images took in the prompt.")
    kv_tokens_prompt: int = Field(description="Prompt entries in each layer's KV cache after prefill.")
    kv_tokens_kept: int = Field(
        description="Prompt entries each layer's KV cache keeps after LOOK-M (kv_tokens_prompt when not compacted)."
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    mmrag: CompressionUsage | None = Field(default=None, description="mmrag: set when the prompt had images.")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="UTF-8 bytes of `token`.")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="The `top_logprobs` most likely tokens, best first.")


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


def _none(value: Any) -> bool:
    return value is None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str = Field(description="JSON text of the arguments object.")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = Field(default=None, exclude_if=_none)


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    retrieval: RetrievalInfo | None = Field(default=None, description="mmrag: what retrieval found and used.")


class FunctionCallDelta(BaseModel):
    name: str | None = Field(default=None, exclude_if=_none)
    arguments: str = ""


class ToolCallDelta(BaseModel):
    """One piece of a streamed call: the first carries ``id``, ``type`` and the name; the rest add arguments."""

    index: int
    id: str | None = Field(default=None, exclude_if=_none)
    type: Literal["function"] | None = Field(default=None, exclude_if=_none)
    function: FunctionCallDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = Field(default=None, exclude_if=_none)


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    retrieval: RetrievalInfo | None = Field(default=None, description="mmrag: on the first chunk only.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mmrag"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


_BRANCH_LABELS = {"str", "int", "float", "bool", "none", "function-after", "function-before"}


def format_error_location(loc: tuple[Any, ...]) -> str:
    """Pydantic's ``("messages", 0, "content", "list[...]", 1, "image_url", "image_url", "url")`` becomes
    ``messages[0].content[1].image_url.url``.

    Pydantic inserts union branch labels (``list[...]``, ``str``) and discriminator tags (which repeat
    the field name that follows); both are dropped so the path reads as the request's own fields.
    """
    parts: list[Any] = []
    for part in loc:
        if isinstance(part, str) and ("[" in part or part in _BRANCH_LABELS):
            continue
        if parts and part == parts[-1] and isinstance(part, str):
            continue
        parts.append(part)
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def json_object(body: bytes) -> dict[str, Any]:
    """A request body decoded as a JSON object; not JSON, nested too deeply or not an object: a 400."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # the decoder recurses per nesting level: ~1000 levels is a client's doing
        raise InvalidRequestError("the request body is nested too deeply") from exc
    if not isinstance(payload, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return payload


Model = TypeVar("Model", bound=BaseModel)


def validated(
    model: type[Model],
    payload: dict[str, Any],
    limits: LimitsConfig | None = None,
    *,
    whole: tuple[str, ...] = (),
    not_fields: Collection[Any] = (),
) -> Model:
    """``payload`` as ``model``, or a 400 naming the field: of pydantic's errors, the deepest location (the most
    specific one when a union reports every branch), read as the request's own fields. ``limits`` bound what
    validation may build (the defaults without). ``whole``: fields whose inner errors are reported as the
    field's own (clients look for ``input``, not ``input[3]``); ``not_fields``: location parts that are type
    tags, not fields."""
    try:
        return model.model_validate(payload, context={"limits": limits})
    except RecursionError as exc:  # validators that walk a nested value (compression.kv) hit the same bound
        raise InvalidRequestError("the request body is nested too deeply") from exc
    except ValidationError as exc:
        error = max(exc.errors(), key=lambda e: len(e["loc"]))
        param = format_error_location(tuple(part for part in error["loc"] if part not in not_fields))
        param = next((field for field in whole if param.startswith(field)), param)
        message = error["msg"].removeprefix("Value error, ")
        raise InvalidRequestError(f"{param}: {message}" if param else message, param=param or None) from exc
