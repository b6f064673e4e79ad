"""OpenAI chat-completions request and response shapes (the subset mmrag serves, validated strictly).

Unknown top-level fields are ignored, as OpenAI-compatible servers do (clients send fields such as
``user`` or ``metadata``), except OpenAI's own fields that would change the answer and that mmrag does not
implement (``tools``, ``response_format``, ``logit_bias``, ...): ignoring those would return a 200 that is
not what the client asked for, so they are a 400 naming the field. Everything mmrag reads is typed and
range-checked here, so a bad value is a 400 naming the field before any work starts.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from mmrag.serving.config import LimitsConfig
from mmrag.serving.errors import InvalidRequestError
from mmrag.serving.retrieval.protocol import RetrievalInfo, RetrievalOptions

_DEFAULT_LIMITS = LimitsConfig()

# OpenAI chat fields that change what the answer is and that mmrag does not implement. They are declared
# (hidden from the OpenAPI document) only to be refused by name; fields that do not change the answer
# (``user``, ``metadata``, ``store``, ``service_tier``, ...) stay ignored, as unknown fields are.
UNSUPPORTED_REQUEST_FIELDS = (
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "response_format",
    "logit_bias",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "verbosity",
    "web_search_options",
)
UNSUPPORTED_MESSAGE_FIELDS = ("tool_calls", "function_call", "tool_call_id", "audio")


def refuse_unsupported(value: Any, info: ValidationInfo) -> Any:
    """A set unsupported field is a 400 naming it; null, an empty list or object, and ``response_format``
    ``{"type": "text"}`` ask for nothing beyond what mmrag does, so some clients' defaults still pass."""
    if value is None or value == [] or value == {} or (info.field_name == "response_format" and value == _TEXT):
        return value
    raise ValueError(f"`{info.field_name}` is not supported by this server")


_TEXT = {"type": "text"}
_Unsupported = SkipJsonSchema[Any]


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


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: _Unsupported = None
    function_call: _Unsupported = None
    tool_call_id: _Unsupported = None
    audio: _Unsupported = None

    _refuse_unsupported = field_validator(*UNSUPPORTED_MESSAGE_FIELDS)(refuse_unsupported)

    @model_validator(mode="after")
    def _images_only_from_users(self) -> ChatMessage:
        images = isinstance(self.content, list) and any(isinstance(p, ImagePart) for p in self.content)
        if images and self.role != "user":
            raise ValueError(f"image_url parts are only accepted in user messages, not {self.role}")
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
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


class ChatCompletionRequest(BaseModel):
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
    # OpenAI fields mmrag does not implement (see UNSUPPORTED_REQUEST_FIELDS): a 400 when set.
    tools: _Unsupported = None
    tool_choice: _Unsupported = None
    parallel_tool_calls: _Unsupported = None
    functions: _Unsupported = None
    function_call: _Unsupported = None
    response_format: _Unsupported = None
    logit_bias: _Unsupported = None
    audio: _Unsupported = None
    modalities: _Unsupported = None
    prediction: _Unsupported = None
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
        if parts > limits.max_content_parts:
            raise ValueError(f"{parts} content parts in all; at most {limits.max_content_parts} per request")
        return messages

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

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


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


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


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


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
