"""Tool calls: which tools the model sees, how a forced call is constrained, and calls read back from output.

``tool_choice`` ``required`` or a named function forces a call with any model: the answer is constrained
(vLLM's structured outputs) to a JSON schema built from the tools' parameters, so it is a valid call every
time, whatever the model: for a named function, its arguments object; for ``required``, an array of
``{"name", "arguments"}`` objects (one item when ``parallel_tool_calls`` is false). :func:`tool_call_deltas`
turns that output into OpenAI's ``tool_calls`` as it streams: a named call's arguments stream as generated,
each call of ``required`` is sent whole as soon as its object closes.

``auto`` (the default with tools) lets the model choose between text and calls, which needs the model's own
call format and a parser for it: vLLM's, named per model by ``model.tool_call_parser`` (:mod:`.tool_parsing`
reads the answer with it). Where none is configured, ``auto`` is a 400 naming ``tool_choice`` that says what
works. ``none`` shows the model no tools.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from mmrag.serving.engine.protocol import GenerationDelta, StructuredOutput, ToolCallChunk
from mmrag.serving.errors import InvalidRequestError
from mmrag.serving.openai.structured import JsonStringEscaper, check_schema, compact_json

if TYPE_CHECKING:
    from mmrag.serving.openai.protocol import ChatCompletionRequest, ChatMessage, Tool
    from mmrag.serving.openai.structured import SchemaBudget

__all__ = ["ToolPlan", "check_tools", "new_call_id", "plan_tools", "template_tool_fields", "tool_call_deltas"]

# A function with no ``parameters`` takes no arguments: an empty object.
_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools and tool choice ask of the engine and of the output.

    ``mode``: ``named`` (one call of ``name``, the output is its arguments), ``required`` (the output is an
    array of calls), ``auto`` (text or calls in the model's own format, read by the configured parser) or
    ``none`` (text; tools unseen). ``prompt_tools``: the tools the model is shown.
    """

    mode: Literal["named", "required", "auto", "none"]
    prompt_tools: list[dict[str, Any]] | None
    structured: StructuredOutput | None
    name: str | None = None


def check_tools(request: ChatCompletionRequest, budget: SchemaBudget) -> None:
    """Names unique, parameter schemas valid and within the request's schema budget, the choice among them."""
    tools = request.tools or []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        name = tool.function.name
        if name in seen:
            raise InvalidRequestError(
                f"tools[{i}].function.name: {name!r} names two tools", param=f"tools[{i}].function.name"
            )
        seen.add(name)
        if tool.function.parameters is not None:
            param = f"tools[{i}].function.parameters"
            budget.spend(compact_json(tool.function.parameters), param)
            check_schema(tool.function.parameters, param)
    choice = request.tool_choice
    if choice is not None and choice != "none" and not tools:
        raise InvalidRequestError("tool_choice needs tools: send tools, or leave tool_choice out", param="tool_choice")
    if choice is not None and not isinstance(choice, str) and choice.function.name not in seen:
        raise InvalidRequestError(
            f"tool_choice names {choice.function.name!r}, which is not among the tools", param="tool_choice"
        )
    forced = choice == "required" or (choice is not None and not isinstance(choice, str))
    response_format = request.response_format
    if forced and response_format is not None and response_format.type != "text":
        raise InvalidRequestError(
            "response_format: a forced tool call (tool_choice required or a function) already fixes the output's "
            "format; send one or the other",
            param="response_format",
        )
    if forced and request.structured_outputs is not None:
        raise InvalidRequestError(
            "structured_outputs cannot be combined with a forced tool call", param="structured_outputs"
        )


def plan_tools(request: ChatCompletionRequest, parser: str | None = None) -> ToolPlan | None:
    """The request's tool plan (None: no tools). ``parser``: the served model's tool-call parser
    (``model.tool_call_parser``); without one, ``auto`` is refused here, with what to send instead."""
    tools = request.tools or []
    choice = request.tool_choice
    if not tools:
        return None
    if choice is None or choice == "auto":
        if parser is None:
            raise InvalidRequestError(
                "tool_choice 'auto' (the default with tools) needs a tool-call parser for the served model "
                "(model.tool_call_parser), and it has none; send tool_choice 'required' or {'type': 'function', "
                "'function': {'name': ...}} (constrained to your schema, valid every time), or 'none'",
                param="tool_choice",
            )
        return ToolPlan(mode="auto", prompt_tools=[_template_tool(t) for t in tools], structured=None)
    if choice == "none":
        return ToolPlan(mode="none", prompt_tools=None, structured=None)
    if choice == "required":
        schema = _calls_schema(tools, parallel=request.parallel_tool_calls is not False)
        structured = StructuredOutput(kind="json", spec=compact_json(schema), param="tools")
        return ToolPlan(mode="required", prompt_tools=[_template_tool(t) for t in tools], structured=structured)
    (tool,) = [t for t in tools if t.function.name == choice.function.name]
    schema = tool.function.parameters or _NO_ARGUMENTS
    structured = StructuredOutput(kind="json", spec=compact_json(schema), param="tools")
    return ToolPlan(mode="named", prompt_tools=[_template_tool(tool)], structured=structured, name=tool.function.name)


def _calls_schema(tools: list[Tool], *, parallel: bool) -> dict[str, Any]:
    """An array of calls, each ``{"name": one of the tools, "arguments": that tool's parameters}``: the name
    comes first so a reader knows the call before its arguments end. Definitions a tool's parameters refer to
    (``$defs``, as pydantic writes them; ``#/$defs/...`` references resolve from the root) move to the root."""
    definitions: dict[str, Any] = {}
    calls = []
    for i, tool in enumerate(tools):
        parameters = dict(tool.function.parameters or _NO_ARGUMENTS)
        for key in ("$defs", "definitions"):
            for name, definition in (parameters.pop(key, None) or {}).items():
                if definitions.setdefault(f"{key}/{name}", definition) != definition:
                    raise InvalidRequestError(
                        f"tools[{i}].function.parameters: {key} {name!r} differs from another tool's; with "
                        "tool_choice required, tools' definitions share one namespace: rename one",
                        param=f"tools[{i}].function.parameters",
                    )
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [tool.function.name]}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
    }
    if not parallel:
        schema["maxItems"] = 1
    for path, definition in definitions.items():
        key, _, name = path.partition("/")
        schema.setdefault(key, {})[name] = definition
    return schema


def _template_tool(tool: Tool) -> dict[str, Any]:
    """A tool as chat templates take it (HF's convention, the OpenAI shape)."""
    function: dict[str, Any] = {"name": tool.function.name, "parameters": tool.function.parameters or _NO_ARGUMENTS}
    if tool.function.description:
        function["description"] = tool.function.description
    return {"type": "function", "function": function}


def template_tool_fields(message: ChatMessage) -> dict[str, Any]:
    """A message's tool fields as chat templates take them: calls with their arguments as an object (HF's
    convention; arguments that are not a JSON object stay text), and a tool result's call id."""
    fields: dict[str, Any] = {}
    if message.tool_calls:
        fields["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": _arguments_object(call.function.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        fields["tool_call_id"] = message.tool_call_id
    return fields


def _arguments_object(arguments: str) -> Any:
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        return arguments
    return value if isinstance(value, dict) else arguments


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


async def tool_call_deltas(deltas: AsyncIterator[GenerationDelta], plan: ToolPlan) -> AsyncIterator[GenerationDelta]:
    """The engine's deltas with the constrained output read as tool calls (``tool_calls``, no ``text``); a
    choice that stopped with calls finishes with ``tool_calls``. Deltas that carry nothing to send (a call
    still being read, no retrieval info, no finish) are dropped; the token counts ride on the later ones."""
    if plan.mode in ("none", "auto"):
        async for delta in deltas:
            yield delta
        return
    readers: dict[int, _NamedCall | _CallArray] = {}
    async for delta in deltas:
        reader = readers.get(delta.index)
        if reader is None:
            reader = readers[delta.index] = _NamedCall(plan.name or "") if plan.mode == "named" else _CallArray()
        calls = reader.feed(delta.text)
        finish = delta.finish_reason
        if finish == "stop" and reader.called:
            finish = "tool_calls"
        if not calls and finish is None and delta.retrieval is None:
            continue
        yield dataclasses.replace(delta, text="", tool_calls=tuple(calls), finish_reason=finish, logprobs=None)


class _NamedCall:
    """The output is one call's arguments: they stream as generated (leading whitespace dropped, raw control
    characters in strings escaped)."""

    def __init__(self, name: str):
        self.name = name
        self.called = False
        self.escaper = JsonStringEscaper()

    def feed(self, text: str) -> list[ToolCallChunk]:
        text = self.escaper.feed(text)
        if not self.called:
            text = text.lstrip()
            if not text:
                return []
            self.called = True
            return [ToolCallChunk(index=0, arguments=text, id=new_call_id(), name=self.name)]
        return [ToolCallChunk(index=0, arguments=text)] if text else []


class _CallArray:
    """The output is a JSON array of ``{"name", "arguments"}`` objects: each is sent once it closes.

    A character scanner tracks strings and nesting; an item is the text between its ``{`` at depth 1 and
    the ``}`` that brings the depth back, parsed whole (the grammar makes it valid JSON, but for raw control
    characters in strings, which the arguments' compact re-dump escapes)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.item: list[str] = []
        self.count = 0

    @property
    def called(self) -> bool:
        return self.count > 0

    def feed(self, text: str) -> list[ToolCallChunk]:
        calls: list[ToolCallChunk] = []
        for ch in text:
            inside = self.depth >= 2 or (self.depth == 1 and ch == "{")  # before this character's own effect
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "[{":
                self.depth += 1
            elif ch in "]}":
                self.depth -= 1
            if inside:
                self.item.append(ch)
            if not self.in_string and self.depth == 1 and ch == "}" and self.item:
                calls.append(self._call("".join(self.item)))
                self.item = []
        return calls

    def _call(self, text: str) -> ToolCallChunk:
        value = json.loads(text, strict=False)  # raw control characters in strings: re-dumped escaped
        call = ToolCallChunk(
            index=self.count,
            arguments=compact_json(value.get("arguments", {})),
            id=new_call_id(),
            name=str(value.get("name", "")),
        )
        self.count += 1
        return call
