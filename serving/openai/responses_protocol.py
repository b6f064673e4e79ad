"""OpenAI Responses API shapes (``POST /v1/responses``): the request mmrag serves, validated strictly, and the
response objects and stream events it sends, as the ``openai`` SDK reads them.

A request is translated into a chat-completions request (:func:`chat_payload`) and served by the chat
pipeline, so images, limits and retrieval are checked once, in one place. What this module checks is what
chat does not have: the ``input`` item and part types, the ``file_search`` tool, ``include``, and OpenAI's
Responses fields that would change the answer and that mmrag does not implement (``previous_response_id``,
``reasoning``, ``text.format`` other than text, other tools, ...): a 400 naming the field, as chat does for
its own. Fields that do not change the answer (``store``, ``user``, ``service_tier``, ``prompt_cache_key``,
...) are accepted and ignored; ``metadata``, ``user`` and the sampling fields are echoed in the response.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from mmrag.serving.config import LimitsConfig
from mmrag.serving.errors import InvalidRequestError, clip
from mmrag.serving.openai.protocol import CompressionOptions, CompressionUsage

# The ``input`` item types served (see check_items): messages, and an earlier turn's file_search call, as
# a client sends a previous response's output back; the call is dropped (its chunks were that turn's).
MESSAGE_ITEM = "message"
ITEM_TYPES = (MESSAGE_ITEM, "file_search_call")


def _refuse(name: str, value: Any, *, allowed: tuple[Any, ...] = ()) -> Any:
    """A set field that mmrag does not implement is a 400 naming it; null (and the listed values) pass."""
    if value is None or value in allowed:
        return value
    raise ValueError(f"`{name}` is not supported by this server")


_Unsupported = SkipJsonSchema[Any]


class _Loose(BaseModel):
    """Unknown keys ignored, as OpenAI-compatible servers do (SDKs add fields over time)."""

    model_config = ConfigDict(extra="ignore")


class InputText(_Loose):
    type: Literal["input_text"]
    text: str


class InputImage(_Loose):
    type: Literal["input_image"]
    file_id: _Unsupported = None  # before image_url: an image sent by file_id is refused for that, by name
    image_url: str = Field(min_length=1, description="A data: URL or an http(s) URL.")
    detail: Literal["auto", "low", "high", "original"] = "auto"

    @field_validator("file_id", mode="before")
    @classmethod
    def _url_only(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("images by file_id are not supported by this server; send image_url")
        return value


class OutputText(_Loose):
    """An earlier assistant turn's text, as the SDK sends a previous response's output back as input."""

    type: Literal["output_text"]
    text: str


class Refusal(_Loose):
    type: Literal["refusal"]
    refusal: str


InputPart = Annotated[InputText | InputImage | OutputText | Refusal, Field(discriminator="type")]
# The part types served (others, input_file and input_audio among them, are refused by name: check_items).
PART_TYPES = ("input_text", "input_image", "output_text", "refusal")
# Union tags pydantic puts in an error's location (not fields of the request).
TAGS = frozenset((*ITEM_TYPES, *PART_TYPES))


class InputMessage(_Loose):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputPart]

    @model_validator(mode="after")
    def _parts_fit_the_role(self) -> InputMessage:
        if isinstance(self.content, list):
            kinds = {part.type for part in self.content}
            if "input_image" in kinds and self.role != "user":
                raise ValueError(f"input_image parts are only accepted in user messages, not {self.role}")
            if kinds & {"output_text", "refusal"} and self.role != "assistant":
                raise ValueError(f"output_text and refusal parts belong to assistant messages, not {self.role}")
        return self


class PastFileSearchCall(_Loose):
    """An earlier response's file_search_call sent back in ``input``: accepted, and not put before the model."""

    type: Literal["file_search_call"]


def _item_type(item: Any) -> Any:
    return item.get("type", MESSAGE_ITEM) if isinstance(item, dict) else getattr(item, "type", None)


InputItem = Annotated[
    Annotated[InputMessage, Tag(MESSAGE_ITEM)] | Annotated[PastFileSearchCall, Tag("file_search_call")],
    Discriminator(_item_type),
]


class RankingOptions(_Loose):
    ranker: Literal["auto", "default-2024-11-15", "none"] | None = None
    score_threshold: _Unsupported = None
    hybrid_search: _Unsupported = None

    @field_validator("score_threshold", "hybrid_search")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse(info.field_name, value)


class FileSearchTool(BaseModel):
    """OpenAI's ``file_search`` tool: the named vector stores are searched with the last user text."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["file_search"]
    vector_store_ids: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        min_length=1, max_length=64
    )
    max_num_results: int | None = Field(
        default=None, ge=1, le=50, description="Chunks put before the model (default: retrieval.top_k)."
    )
    filters: dict[str, Any] | None = Field(
        default=None, description="OpenAI attribute filters (comparison or compound), as on vector store search."
    )
    ranking_options: RankingOptions | None = None


class TextFormat(_Loose):
    type: Literal["text"] = Field(description="Plain text only: json_schema and json_object are not supported.")


class TextConfig(_Loose):
    format: TextFormat | None = None
    verbosity: _Unsupported = None

    @field_validator("verbosity")
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        return _refuse("verbosity", value, allowed=("medium",))


# Top-level Responses fields that change the answer and that mmrag does not implement (null passes).
UNSUPPORTED_FIELDS = (
    "previous_response_id",
    "conversation",
    "prompt",
    "reasoning",
    "context_management",
    "moderation",
    "max_tool_calls",
    "background_options",
)


class ResponsesRequest(BaseModel):
    """``POST /v1/responses``: the subset mmrag serves (see the module docstring)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    input: str | list[InputItem] = Field(description="A user message's text, or a list of messages.")
    instructions: str | None = Field(default=None, description="A system message put before the input.")
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    include: list[Literal["file_search_call.results"]] | None = None
    tools: list[FileSearchTool] | None = Field(default=None, max_length=1, description="At most one file_search.")
    tool_choice: Literal["auto", "none"] | None = Field(
        default=None, description="auto: the tools are used; none: they are not (no search)."
    )
    text: TextConfig | None = None
    metadata: (
        dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=512)]] | None
    ) = Field(default=None, max_length=16)
    user: str | None = Field(default=None, max_length=256)
    store: bool | None = Field(default=None, description="Accepted; nothing is stored (no GET /v1/responses/{id}).")
    parallel_tool_calls: bool | None = None
    truncation: Literal["disabled"] | None = Field(
        default=None, description="disabled only: an input that does not fit is a 400, never cut."
    )
    background: Literal[False] | None = Field(default=None, description="false only: every response is foreground.")
    top_logprobs: Literal[0] | None = None
    # mmrag extension, as on chat: per-request compression (AIM keep ratio, KV method).
    compression: CompressionOptions | None = None
    previous_response_id: _Unsupported = None
    conversation: _Unsupported = None
    prompt: _Unsupported = None
    reasoning: _Unsupported = None
    context_management: _Unsupported = None
    moderation: _Unsupported = None
    max_tool_calls: _Unsupported = None
    background_options: _Unsupported = None

    @field_validator(*UNSUPPORTED_FIELDS)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse(info.field_name, value, allowed=({}, []))

    @property
    def file_search(self) -> FileSearchTool | None:
        """The file_search tool, when the request has one and ``tool_choice`` does not turn tools off."""
        if not self.tools or self.tool_choice == "none":
            return None
        return self.tools[0]

    @property
    def include_results(self) -> bool:
        return "file_search_call.results" in (self.include or ())


def check_items(payload: dict[str, Any], limits: LimitsConfig) -> None:
    """What pydantic would report vaguely, refused by name before validation: items and parts are counted
    first (a body of a million parts costs the counting, not a million models), then input items other than
    messages (tool calls and outputs, reasoning, references: a tool-using conversation mmrag does not run),
    part types other than PART_TYPES, and tools other than file_search."""
    items = payload.get("input")
    if isinstance(items, list):
        if not items:
            raise InvalidRequestError("input: give at least one input item", param="input")
        if len(items) > limits.max_messages:
            raise InvalidRequestError(
                f"input: {len(items)} items; at most {limits.max_messages} per request", param="input"
            )
        parts = sum(len(m["content"]) for m in items if isinstance(m, dict) and isinstance(m.get("content"), list))
        if parts > limits.max_content_parts:
            raise InvalidRequestError(
                f"input: {parts} content parts in all; at most {limits.max_content_parts} per request", param="input"
            )
        for i, item in enumerate(items):
            kind = item.get("type", MESSAGE_ITEM) if isinstance(item, dict) else MESSAGE_ITEM
            if kind not in ITEM_TYPES:
                raise InvalidRequestError(
                    f"input[{i}].type: items of type {clip(kind, 64)} are not supported by this server "
                    f"(only {' and '.join(ITEM_TYPES)})",
                    param=f"input[{i}].type",
                )
            content = item.get("content") if isinstance(item, dict) else None
            for j, part in enumerate(content if isinstance(content, list) else ()):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind not in PART_TYPES:
                    raise InvalidRequestError(
                        f"input[{i}].content[{j}].type: parts of type {clip(kind, 64)} are not supported by this "
                        f"server (only {', '.join(PART_TYPES)})",
                        param=f"input[{i}].content[{j}].type",
                    )
    tools = payload.get("tools")
    if isinstance(tools, list):
        for i, tool in enumerate(tools):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind is not None and kind != "file_search":
                raise InvalidRequestError(
                    f"tools[{i}].type: tool type {clip(kind, 64)} is not supported by this server (only file_search)",
                    param=f"tools[{i}].type",
                )


def chat_payload(request: ResponsesRequest, retrieval: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions body that asks the pipeline for this response (``retrieval``: its options)."""
    messages: list[dict[str, Any]] = []
    if request.instructions is not None:
        messages.append({"role": "system", "content": request.instructions})
    if isinstance(request.input, str):
        messages.append({"role": "user", "content": request.input})
    else:
        messages.extend({"role": m.role, "content": _chat_content(m.content)} for _, m in input_messages(request))
    payload: dict[str, Any] = {"model": request.model, "messages": messages, "retrieval": retrieval}
    optional = {
        "max_completion_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "compression": request.compression.model_dump(exclude_none=True) if request.compression else None,
    }
    payload.update({key: value for key, value in optional.items() if value is not None})
    return payload


def input_messages(request: ResponsesRequest) -> list[tuple[int, InputMessage]]:
    """The messages of a list ``input``, with their positions in it (past tool calls skipped)."""
    if isinstance(request.input, str):
        return []
    return [(i, item) for i, item in enumerate(request.input) if isinstance(item, InputMessage)]


def _chat_content(content: str | list[Any]) -> str | list[dict[str, Any]]:
    """Parts keep their positions, so an error on ``messages[i].content[j]`` names ``input[i].content[j]``."""
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, InputImage):
            detail = "high" if part.detail == "original" else part.detail
            parts.append({"type": "image_url", "image_url": {"url": part.image_url, "detail": detail}})
        else:
            parts.append({"type": "text", "text": part.refusal if isinstance(part, Refusal) else part.text})
    return parts


# ---------------------------------------------------------------------------------------------------
# Response objects (built as plain dicts in OpenAI's shapes; these models document and check them)


class FileCitation(BaseModel):
    type: Literal["file_citation"] = "file_citation"
    file_id: str
    filename: str
    index: int = Field(description="Where in the text the citation goes: here, always the end of the text.")


class OutputTextPart(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[FileCitation] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputTextPart]


class FileSearchResult(BaseModel):
    file_id: str | None
    filename: str | None
    score: float
    text: str
    attributes: dict[str, str | float | bool] | None = None


class FileSearchCall(BaseModel):
    id: str
    type: Literal["file_search_call"] = "file_search_call"
    status: Literal["in_progress", "searching", "completed", "incomplete", "failed"]
    queries: list[str]
    results: list[FileSearchResult] | None = None


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int
    mmrag: CompressionUsage | None = Field(default=None, description="mmrag: set when the prompt had images.")


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def now() -> float:
    return time.time()
