"""A deterministic in-process engine for fast tests of everything above the engine.

It answers with the words of the last user text, one delta per word, and honours ``n``,
``max_tokens``, ``logprobs`` (word k has log-probability ``-k/10``; its alternatives are ``alt1 ``,
``alt2 ``... each 1.0 lower), ``prompt_logprobs`` (a completions prompt's words with the spaces before them,
word k at ``-k/10 - 1``, the first NaN) and the image count. Special user texts:

- ``"slow"`` streams forever (until aborted);
- ``"die"`` ends the replica's process after one delta (a crashed engine);
- ``"sleep SECONDS"`` (e.g. ``"sleep 0.5"``) waits that long, then answers ``"slept "`` (load tests).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.protocol import Engine, GenerationDelta, GenerationRequest, TokenLogprob
from mmrag.serving.errors import InvalidRequestError


class FakeEngine(Engine):
    def __init__(self, config: MmragConfig, model_path: str = "fake", *, special_texts: bool = True):
        self.config = config
        self.special_texts = special_texts  # off for fuzzing: no endless streams, no process exits
        self.running = 0
        self.seen: list[GenerationRequest] = []

    async def start(self) -> None:
        # A slow start (set through the replica's environment) makes a restart window observable.
        await asyncio.sleep(float(os.environ.get("MMRAG_FAKE_ENGINE_START_S", "0")))

    @property
    def max_model_len(self) -> int:
        return self.config.engine.max_model_len

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        self.seen.append(request)
        words = last_user_text(request).split() or ["ok"]
        if not self.special_texts:
            words = [w for w in words if w not in ("slow", "die", "sleep")] or ["ok"]
        prompt_tokens = sum(len(str(m["content"]).split()) for m in request.messages) + 16 * len(request.images)
        prompt_tokens += len((request.prompt or "").split())
        if prompt_tokens >= self.max_model_len:
            raise InvalidRequestError("prompt too long", param="messages" if request.prompt is None else "prompt")
        self.running += 1
        try:
            if words == ["slow"]:
                async for delta in self._forever(prompt_tokens):
                    yield delta
                return
            if words == ["die"]:  # the replica process dies mid-request, as a crashed engine would
                yield GenerationDelta(0, "dying ", None, prompt_tokens, 1)
                os._exit(1)
            seconds = sleep_seconds(words)
            if seconds is not None:
                await asyncio.sleep(seconds)
                yield GenerationDelta(0, "slept ", "stop", prompt_tokens, 1)
                return
            limit = request.sampling.max_tokens or len(words)
            produced = 0
            for step in range(min(limit, len(words))):
                for index in range(request.sampling.n):
                    produced += 1
                    done = step == min(limit, len(words)) - 1
                    reason = ("length" if limit < len(words) else "stop") if done else None
                    logprobs = _logprobs(words[step] + " ", step, request.sampling.logprobs)
                    scored = _prompt_logprobs(request) if step == 0 else None
                    yield GenerationDelta(
                        index,
                        words[step] + " ",
                        reason,
                        prompt_tokens,
                        produced,
                        logprobs=logprobs,
                        prompt_logprobs=scored,
                    )
                await asyncio.sleep(0)
        finally:
            self.running -= 1

    async def _forever(self, prompt_tokens: int) -> AsyncIterator[GenerationDelta]:
        produced = 0
        while True:
            produced += 1
            yield GenerationDelta(0, "tick ", None, prompt_tokens, produced)
            await asyncio.sleep(0.01)

    async def check_health(self) -> None:
        pass

    def metrics_text(self) -> str:
        return f"fake_engine_running {self.running}\n"


def sleep_seconds(words: list[str]) -> float | None:
    """``["sleep", "0.5"]`` -> 0.5; anything else -> None (answered as plain words)."""
    if len(words) != 2 or words[0] != "sleep":
        return None
    try:
        seconds = float(words[1])
    except ValueError:
        return None
    return seconds if 0 <= seconds < float("inf") else None


def last_user_text(request: GenerationRequest) -> str:
    if request.prompt is not None:  # a completions prompt: answered with its words, as a user text is
        return request.prompt
    for message in reversed(request.messages):
        if message["role"] == "user":
            content = message["content"]
            if isinstance(content, str):
                return content
            return " ".join(p["text"] for p in content if p["type"] == "text")
    return ""


def _prompt_logprobs(request: GenerationRequest) -> tuple[TokenLogprob, ...] | None:
    top_k = request.sampling.prompt_logprobs
    if top_k is None or request.prompt is None:
        return None
    tokens = re.findall(r"\s*\S+", request.prompt)
    first = TokenLogprob(tokens[0], float("nan")) if tokens else None
    rest = [_logprobs(token, k, top_k, shift=-1.0)[0] for k, token in enumerate(tokens) if k]  # type: ignore[index]
    return (first, *rest) if first else ()


def _logprobs(token: str, step: int, top_k: int | None, shift: float = 0.0) -> tuple[TokenLogprob, ...] | None:
    if top_k is None:
        return None
    logprob = -step / 10 + shift
    top = [(token, logprob), *((f"alt{i} ", logprob - i) for i in range(1, top_k))][:top_k]
    return (TokenLogprob(token, logprob, tuple(top)),)
