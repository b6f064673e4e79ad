"""Tools and tool messages in the prompt: through the chat template when it has a tools section, else a
documented fallback rendering that works with any template.

A template that reads ``tools`` gets them as HF templates expect (``apply_chat_template(..., tools=...)``); one
that reads ``tool_calls`` gets assistant calls and ``tool`` messages as they are. Without (SmolLM2's, the
tiny test models'), the fallback writes them as text in the Hermes convention many models were trained on:

- the tools, as one JSON schema per line inside ``<tools></tools>``, in a system message (appended to the
  first one, or a new one first), asking for calls as ``<tool_call>`` blocks: what vLLM's ``hermes`` parser
  reads back for ``tool_choice: auto`` (a forced call's output is fixed by its grammar instead);
- an assistant's calls as ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` after its text;
- ``tool`` results as a user turn of ``<tool_response>...</tool_response>`` blocks (consecutive results share
  one turn), so templates that only know system, user and assistant, or that require turns to alternate,
  still render.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mmrag.serving.errors import InvalidRequestError

__all__ = ["TOOLS_PREAMBLE", "reject_special_tool_text", "render_tools"]

TOOLS_PREAMBLE = (
    "You can call functions to help answer. Their JSON schemas, one per line:\n<tools>\n{tools}\n</tools>\n"
    "To call one, answer with its name and arguments as JSON inside <tool_call></tool_call> tags:\n"
    '<tool_call>\n{{"name": <function name>, "arguments": <object>}}\n</tool_call>'
)


def _reads(chat_template: str, variable: str) -> bool:
    return re.search(rf"\b{variable}\b", chat_template) is not None


def render_tools(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, chat_template: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """``(messages, tools)`` as ``apply_chat_template`` should get them for this template."""
    native_tools = _reads(chat_template, "tools")
    native_calls = _reads(chat_template, "tool_calls")
    if native_calls or not any("tool_calls" in m or m["role"] == "tool" for m in messages):
        rendered = list(messages)
    else:
        rendered = _calls_as_text(messages)
    if not tools or native_tools:
        return rendered, tools if tools else None
    block = TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if rendered and rendered[0]["role"] == "system":
        first = dict(rendered[0])
        content = first["content"]
        first["content"] = (
            f"{content}\n\n{block}"
            if isinstance(content, str)
            else [*content, {"type": "text", "text": "\n\n" + block}]
        )
        return [first, *rendered[1:]], None
    return [{"role": "system", "content": block}, *rendered], None


def _calls_as_text(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] == "tool":
            block = f"<tool_response>\n{_text(message['content'])}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        calls = message.get("tool_calls")
        if calls:
            text = "\n".join(
                "<tool_call>\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False
                )
                + "\n</tool_call>"
                for c in calls
            )
            before = _text(message["content"])
            message = {"role": message["role"], "content": f"{before}\n{text}" if before else text}
        out.append(message)
    return [{k: v for k, v in m.items() if k != "_tool_results"} for m in out]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or ())


def reject_special_tool_text(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, specials: list[str]
) -> None:
    """Tool definitions and calls become prompt text too: like message text, they must not carry the
    tokenizer's special tokens (a forged turn or image slot)."""
    texts = [("tools", json.dumps(tool, ensure_ascii=False)) for tool in tools or ()]
    for i, message in enumerate(messages):
        for j, call in enumerate(message.get("tool_calls") or ()):
            texts.append((f"messages[{i}].tool_calls[{j}]", json.dumps(call, ensure_ascii=False)))
    for param, text in texts:
        token = next((t for t in specials if t in text), None)
        if token is not None:
            raise InvalidRequestError(f"{param} contains the tokenizer's reserved token {token!r}", param=param)
