"""OpenAI attribute filters -> a Milvus boolean expression over the chunks' ``metadata["attributes"]``.

OpenAI's filters are JSON: a comparison ``{"type": "eq"|"ne"|"gt"|"gte"|"lt"|"lte"|"in"|"nin", "key", "value"}``
or a compound ``{"type": "and"|"or", "filters": [...]}``. Nothing of the client's reaches the expression
unescaped: keys and string values become string literals (backslash, quote and the common control
characters escaped, the rest refused), numbers are written by us, nesting and list sizes are bounded (Milvus
Lite parses in this very process, recursively). Milvus Lite refuses ``in`` on a JSON path, so ``in`` is
written as ``==`` alternatives and ``nin`` as their negation. Every refusal is a :class:`FilterError`, a
400 naming ``filters``.
"""

from __future__ import annotations

import math
from typing import Any

MAX_DEPTH = 8
MAX_CONDITIONS = 64
MAX_IN_VALUES = 64
_OPERATORS = {"eq": "==", "ne": "!=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
ATTRIBUTES = 'metadata["attributes"]'


class FilterError(ValueError):
    """The filter is not one this server can translate (the message says where: ``filters.filters[1].key``)."""


def to_milvus(filters: Any) -> str:
    """The Milvus expression of an OpenAI filter (comparison or compound)."""
    budget = [MAX_CONDITIONS]
    return _translate(filters, "filters", 1, budget)


def _translate(node: Any, where: str, depth: int, budget: list[int]) -> str:
    if depth > MAX_DEPTH:
        raise FilterError(f"{where}: filters nest at most {MAX_DEPTH} levels deep")
    if not isinstance(node, dict):
        raise FilterError(f"{where}: a filter is an object with a type")
    kind = node.get("type")
    if kind in ("and", "or"):
        _only(node, {"type", "filters"}, where)
        children = node.get("filters")
        if not isinstance(children, list) or not children:
            raise FilterError(f"{where}.filters: a non-empty list of filters")
        parts = [_translate(c, f"{where}.filters[{i}]", depth + 1, budget) for i, c in enumerate(children)]
        return "(" + f" {kind} ".join(parts) + ")"
    if kind not in (*_OPERATORS, "in", "nin"):
        raise FilterError(f"{where}.type: one of eq, ne, gt, gte, lt, lte, in, nin, and, or")
    _only(node, {"type", "key", "value"}, where)
    budget[0] -= 1
    if budget[0] < 0:
        raise FilterError(f"{where}: at most {MAX_CONDITIONS} comparisons in one filter")
    key = node.get("key")
    if not isinstance(key, str) or not 0 < len(key) <= 64:
        raise FilterError(f"{where}.key: a string of 1 to 64 characters")
    field = f"{ATTRIBUTES}[{literal(key, f'{where}.key')}]"
    value = node.get("value")
    if kind in ("in", "nin"):
        if not isinstance(value, list) or not 0 < len(value) <= MAX_IN_VALUES:
            raise FilterError(f"{where}.value: a list of 1 to {MAX_IN_VALUES} strings or numbers for {kind!r}")
        alternatives = [f"{field} == {_scalar(v, f'{where}.value[{i}]', False)}" for i, v in enumerate(value)]
        either = "(" + " or ".join(alternatives) + ")"
        return either if kind == "in" else f"(not {either})"
    if kind in ("gt", "gte", "lt", "lte") and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise FilterError(f"{where}.value: {kind!r} compares numbers")
    return f"{field} {_OPERATORS[kind]} {_scalar(value, f'{where}.value', True)}"


def _only(node: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(node) - allowed)
    if extra:
        raise FilterError(f"{where}: unknown field {extra[0]!r}")


def _scalar(value: Any, where: str, allow_bool: bool) -> str:
    if isinstance(value, bool):
        if not allow_bool:
            raise FilterError(f"{where}: strings or numbers only")
        return "true" if value else "false"
    if isinstance(value, int):
        if abs(value) > 2**53:
            raise FilterError(f"{where}: numbers within ±2^53")
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FilterError(f"{where}: numbers must be finite")
        return repr(value)
    if isinstance(value, str):
        return literal(value, where)
    raise FilterError(f"{where}: a string, number or boolean")


def literal(text: str, where: str) -> str:
    """A Milvus string literal of ``text``; other control characters than newline, CR and tab are refused."""
    if len(text) > 512:
        raise FilterError(f"{where}: at most 512 characters")
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F or 0xD800 <= ord(char) <= 0xDFFF:
            raise FilterError(f"{where}: control characters are not accepted")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'
