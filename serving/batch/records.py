"""The OpenAI Batch file format: input lines in, output lines out.

Input line: ``{"custom_id": str, "method": "POST", "url": "/v1/chat/completions", "body": {...}}``.
Output line: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"} | null, "error"}``.

``error`` is ``{"code", "message", "line"}`` whenever a line did not succeed (``line`` is the 1-based
input line, an mmrag addition so a failure can be found in the input); ``response`` holds the answer
the server would have sent, a 4xx/5xx with its OpenAI error body included, and is null only for lines
that never reached the chain (unreadable JSON, wrong method or url).
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmrag.serving.errors import OpenAIError

CHAT_URL = "/v1/chat/completions"

# What identifies a line across runs: its custom_id, or its line number when it has none.
LineKey = tuple[str, str | int]


class BatchInputError(ValueError):
    """The input cannot be run at all (unreadable file, duplicate custom_ids): nothing was started."""


@dataclass(frozen=True)
class BatchLine:
    """One non-blank input line. ``problem`` set: the line is recorded as an error without running."""

    line: int
    custom_id: str | None
    body: dict[str, Any] | None
    problem: str | None = None

    @property
    def key(self) -> LineKey:
        return ("custom_id", self.custom_id) if self.custom_id is not None else ("line", self.line)


def parse_line(number: int, text: str) -> BatchLine:
    """Check one line's envelope; the body itself is validated later by the chain (as the server does)."""
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        return BatchLine(number, None, None, f"not valid JSON: {exc}")
    if not isinstance(payload, dict):
        return BatchLine(number, None, None, "a line must be a JSON object")
    custom_id = payload.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BatchLine(number, None, None, "custom_id must be a non-empty string")
    problem = None
    if payload.get("method") != "POST":
        problem = f"method must be 'POST', not {payload.get('method')!r}"
    elif payload.get("url") != CHAT_URL:
        problem = f"url must be {CHAT_URL!r}, not {payload.get('url')!r}"
    elif not isinstance(payload.get("body"), dict):
        problem = "body must be a JSON object (the chat completion request)"
    return BatchLine(number, custom_id, None if problem else payload["body"], problem)


def read_batch_input(path: str | Path) -> list[BatchLine]:
    """Every non-blank line of ``path``; raises :class:`BatchInputError` on repeated custom_ids."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BatchInputError(f"cannot read {path}: {exc}") from exc
    lines = [parse_line(number, raw) for number, raw in enumerate(text.splitlines(), 1) if raw.strip()]
    check_unique_ids(lines)
    return lines


def check_unique_ids(lines: list[BatchLine]) -> None:
    # Rejected before any work: with a repeated id, resume could not tell which request an answer is for.
    where: dict[str, list[int]] = defaultdict(list)
    for line in lines:
        if line.custom_id is not None:
            where[line.custom_id].append(line.line)
    repeated = {cid: numbers for cid, numbers in where.items() if len(numbers) > 1}
    if repeated:
        shown = "; ".join(f"{cid!r} on lines {', '.join(map(str, n))}" for cid, n in list(repeated.items())[:10])
        more = f" (and {len(repeated) - 10} more)" if len(repeated) > 10 else ""
        raise BatchInputError(f"duplicate custom_id: {shown}{more}")


def new_record_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def success_record(line: BatchLine, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
    response = {"status_code": 200, "request_id": request_id, "body": body}
    return {"id": new_record_id(), "custom_id": line.custom_id, "response": response, "error": None}


def failure_record(line: BatchLine, request_id: str, exc: OpenAIError) -> dict[str, Any]:
    """The answer the server would have sent (status + OpenAI error body), plus the line's error."""
    response = {"status_code": exc.status_code, "request_id": request_id, "body": exc.to_dict()}
    error = {"code": exc.code or exc.error_type, "message": exc.message, "line": line.line}
    return {"id": new_record_id(), "custom_id": line.custom_id, "response": response, "error": error}


def invalid_line_record(line: BatchLine) -> dict[str, Any]:
    error = {"code": "invalid_batch_line", "message": line.problem, "line": line.line}
    return {"id": new_record_id(), "custom_id": line.custom_id, "response": None, "error": error}


def record_key(record: dict[str, Any]) -> LineKey:
    if record.get("custom_id") is not None:
        return ("custom_id", record["custom_id"])
    return ("line", int((record.get("error") or {}).get("line", 0)))
