"""Structured outputs: what a chat request asks the engine to constrain its answer to, checked at the edge.

``response_format`` (``json_object``, ``json_schema``), vLLM's ``structured_outputs`` extra and a forced tool
call (:mod:`.tools`) each become one :class:`~mmrag.serving.engine.protocol.StructuredOutput`, which the engine
hands to vLLM's structured-output backend (``engine.engine_kwargs.structured_outputs_config``; vLLM's ``auto``
by default: xgrammar, falling back to llguidance for schema features xgrammar lacks). Every schema is
checked here against its JSON Schema meta-schema and the request's schemas are bounded in size
(``limits.max_schema_bytes``), so a bad or huge schema is a 400 naming its field before any generation and
never reaches a grammar compiler (:mod:`.constraints` runs these checks with the tools' in request parsing, which
the pipeline moves off the event loop for large bodies).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from mmrag.serving.engine.protocol import GenerationDelta, StructuredOutput
from mmrag.serving.errors import InvalidRequestError

if TYPE_CHECKING:
    from mmrag.serving.openai.protocol import ChatCompletionRequest

__all__ = [
    "JsonStringEscaper",
    "SchemaBudget",
    "check_schema",
    "compact_json",
    "escaped_json_deltas",
    "structured_output",
]


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def check_schema(schema: dict[str, Any], param: str) -> None:
    """A 400 naming ``param`` unless ``schema`` is a valid JSON schema (of the draft its ``$schema`` names,
    2020-12 without one)."""
    from jsonschema import Draft202012Validator, SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        at = f" at {where}" if where else ""
        raise InvalidRequestError(f"{param}: not a valid JSON schema{at}: {exc.message}", param=param) from None
    except RecursionError:
        raise InvalidRequestError(f"{param}: the schema is nested too deeply", param=param) from None


class SchemaBudget:
    """The bytes of schema a request may send, spent field by field: the field that overflows is named."""

    def __init__(self, limit: int):
        self.left = limit
        self.limit = limit

    def spend(self, text: str, param: str) -> None:
        self.left -= len(text.encode("utf-8"))
        if self.left < 0:
            raise InvalidRequestError(
                f"{param}: the request's schemas exceed {self.limit} bytes of compact JSON (limits.max_schema_bytes)",
                param=param,
            )


def structured_output(request: ChatCompletionRequest) -> StructuredOutput | None:
    """The constraint ``response_format`` or ``structured_outputs`` asks for (None: free text)."""
    response_format = request.response_format
    if response_format is not None and response_format.type == "json_object":
        return StructuredOutput(kind="json_object", param="response_format")
    if response_format is not None and response_format.type == "json_schema":
        schema = response_format.json_schema.json_schema
        if schema is None:  # OpenAI makes the schema optional: any JSON object then
            return StructuredOutput(kind="json_object", param="response_format")
        return StructuredOutput(kind="json", spec=compact_json(schema), param="response_format.json_schema.schema")
    extra = request.structured_outputs
    if extra is None:
        return None
    if extra.json_schema is not None:
        return StructuredOutput(kind="json", spec=compact_json(extra.json_schema), param="structured_outputs.json")
    if extra.regex is not None:
        return StructuredOutput(kind="regex", spec=extra.regex, param="structured_outputs.regex")
    if extra.choice is not None:
        return StructuredOutput(kind="choice", choices=tuple(extra.choice), param="structured_outputs.choice")
    return StructuredOutput(kind="grammar", spec=extra.grammar, param="structured_outputs.grammar")


class JsonStringEscaper:
    """Streamed JSON text with raw control characters inside its strings escaped (``\\u0007``).

    The grammars accept them unescaped (a random model writes them; JSON forbids them, and strict parsers such
    as Python's and pydantic's refuse the whole document). Outside strings the only control characters a
    grammar lets through are whitespace, which JSON allows; those pass unchanged.
    """

    def __init__(self) -> None:
        self.in_string = False
        self.escaped = False

    def feed(self, text: str) -> str:
        out: list[str] = []
        for ch in text:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                elif ch < " ":
                    out.append(f"\\u{ord(ch):04x}")
                    continue
            elif ch == '"':
                self.in_string = True
            out.append(ch)
        return "".join(out)


async def escaped_json_deltas(deltas: AsyncIterator[GenerationDelta]) -> AsyncIterator[GenerationDelta]:
    """A JSON answer's deltas with :class:`JsonStringEscaper` applied to each choice's text."""
    escapers: dict[int, JsonStringEscaper] = {}
    async for delta in deltas:
        escaper = escapers.setdefault(delta.index, JsonStringEscaper())
        yield dataclasses.replace(delta, text=escaper.feed(delta.text))
