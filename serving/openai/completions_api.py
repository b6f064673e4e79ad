"""``POST /v1/completions``: OpenAI's legacy completions, a raw text prompt straight to the LLM.

No chat template and no retrieval: the prompt is the whole model input (``GenerationRequest.prompt``), so a
client that writes its own template, or a few-shot prompt, gets exactly that. Each prompt of a list is its own
generation of ``n`` choices (choice ``index`` = prompt index x ``n`` + choice); their streams are merged as
they come. Every generation's first output is awaited before anything is sent, so a prompt that does not
fit the context is a clean 400 naming ``prompt``, streaming or not. The limits, API keys, body rules and
metrics are chat's; see :mod:`.completions_protocol` for what is refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.protocol import GenerationDelta, GenerationRequest, TokenLogprob
from mmrag.serving.errors import InvalidRequestError, ModelNotFoundError, OpenAIError
from mmrag.serving.metrics import IngressMetrics
from mmrag.serving.openai.completions_protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    new_completion_id,
)
from mmrag.serving.openai.observed import observed
from mmrag.serving.openai.protocol import Usage, json_object, now, validated
from mmrag.serving.openai.streaming import StreamThenCall
from mmrag.serving.openai.vector_stores_api import documented
from mmrag.serving.pipeline import (
    CHARS_PER_TOKEN_BOUND,
    INLINE_PARSE_BYTES,
    ChatPipeline,
    compression_settings,
    reject_lone_surrogates,
    sampling_options,
)

logger = logging.getLogger(__name__)

# Deltas of a multi-prompt request waiting for the client: the engines pause once this many are queued.
_MERGE_QUEUE = 64


def parse_completion_body(body: bytes, config: MmragConfig) -> CompletionRequest:
    """A body -> a validated request; every refusal a 400 naming the field."""
    payload = json_object(body)
    if b"\\u" in body:
        reject_lone_surrogates(payload)
    return validated(CompletionRequest, payload, config.limits, whole=("prompt",))


def check_completion_limits(request: CompletionRequest, config: MmragConfig) -> None:
    """The server's limits, before any generation starts (chat's rules for the fields both have)."""
    limits = config.limits
    if request.model != config.model.served_name:
        raise ModelNotFoundError(request.model)
    if request.n > limits.max_n:
        raise InvalidRequestError(f"n must be at most {limits.max_n}", param="n")
    if request.n > 1 and request.temperature == 0:
        raise InvalidRequestError("n > 1 needs temperature > 0 (greedy choices would be equal)", param="n")
    cap = limits.max_completion_tokens
    if cap is not None and (request.max_tokens or 0) > cap:
        raise InvalidRequestError(f"max_tokens must be at most {cap}", param="max_tokens")
    # The exact count is the engine's; this refuses for the price of len() what no tokenization could fit.
    chars = limits.max_prompt_chars or CHARS_PER_TOKEN_BOUND * config.engine.max_model_len
    for i, prompt in enumerate(request.prompts):
        if len(prompt) > chars:
            where = "prompt" if isinstance(request.prompt, str) else f"prompt[{i}]"
            raise InvalidRequestError(
                f"{where} has {len(prompt)} characters; at most {chars} fit this server's context "
                f"({config.engine.max_model_len} tokens)",
                param="prompt",
                code="context_length_exceeded",
            )


def generation_requests(request: CompletionRequest, completion_id: str, config: MmragConfig) -> list[GenerationRequest]:
    sampling = sampling_options(request)
    compression = compression_settings(None, config.compression)
    return [
        GenerationRequest(
            request_id=f"{completion_id}-{i}", messages=[], prompt=prompt, sampling=sampling, compression=compression
        )
        for i, prompt in enumerate(request.prompts)
    ]


@dataclass
class ChoiceText:
    """One choice as it grows: its text (the prompt first with ``echo``) and its legacy log-probabilities."""

    text: str = ""
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None

    def add(self, delta: GenerationDelta, prefix: str = "") -> tuple[str, CompletionLogprobs | None]:
        """Append a delta; returns the new text and the new log-probabilities (for a stream chunk). With
        ``echo``, ``prefix`` is the prompt, and its tokens' log-probabilities (``delta.prompt_logprobs``) come
        first: the first token's is null, as it has nothing before it."""
        if delta.logprobs is None and delta.prompt_logprobs is None:
            self.text += prefix + delta.text
            self.finish_reason = delta.finish_reason or self.finish_reason
            return prefix + delta.text, None
        new = CompletionLogprobs()
        if prefix and delta.prompt_logprobs is not None:
            offset = len(self.text)
            for token in delta.prompt_logprobs:
                _append(new, token, offset)
                offset += len(token.token)
        offset = len(self.text) + len(prefix)
        for token in delta.logprobs or ():
            _append(new, token, offset)
            offset += len(token.token)
        self.text += prefix + delta.text
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.logprobs = self.logprobs or CompletionLogprobs()
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(self.logprobs, name).extend(getattr(new, name))
        return prefix + delta.text, new


def _append(logprobs: CompletionLogprobs, token: TokenLogprob, offset: int) -> None:
    """One token in the legacy shape; a NaN log-probability (a prompt's first token) is null."""
    scored = token.logprob == token.logprob
    top = dict(token.top)
    if scored:
        top.setdefault(token.token, token.logprob)  # OpenAI: the k likeliest and the sampled one
    logprobs.tokens.append(token.token)
    logprobs.token_logprobs.append(token.logprob if scored else None)
    logprobs.top_logprobs.append(top if scored else None)
    logprobs.text_offset.append(offset)


@dataclass
class CompletionState:
    """Every choice of a request, and the usage summed over its prompts."""

    request: CompletionRequest
    choices: dict[int, ChoiceText] = field(default_factory=dict)
    last: dict[int, GenerationDelta] = field(default_factory=dict)  # per prompt: its counts are cumulative

    def add(self, prompt_index: int, delta: GenerationDelta) -> tuple[int, str, CompletionLogprobs | None]:
        index = prompt_index * self.request.n + delta.index
        choice = self.choices.get(index)
        prefix = ""
        if choice is None:
            choice = self.choices[index] = ChoiceText()
            prefix = self.request.prompts[prompt_index] if self.request.echo else ""
        self.last[prompt_index] = delta
        text, logprobs = choice.add(delta, prefix)
        return index, text, logprobs

    def usage(self) -> Usage:
        prompt = sum(d.prompt_tokens for d in self.last.values())
        completion = sum(d.completion_tokens for d in self.last.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def first_outputs(streams: list[AsyncIterator[GenerationDelta]]) -> list[GenerationDelta | None]:
    """Every stream's first delta (a refused prompt raises here, before any byte is sent; the other
    generations are then closed, which aborts them in the engine)."""
    results = await asyncio.gather(*(anext(stream, None) for stream in streams), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await close_all(streams)
        raise errors[0]
    return results  # type: ignore[return-value]


async def close_all(streams: list[AsyncIterator[GenerationDelta]]) -> None:
    for stream in streams:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def merged(
    streams: list[AsyncIterator[GenerationDelta]], firsts: list[GenerationDelta | None]
) -> AsyncIterator[tuple[int, GenerationDelta]]:
    """(prompt index, delta) from every stream as they come, each stream's first delta first."""
    if len(streams) == 1:
        if firsts[0] is not None:
            yield 0, firsts[0]
            async for delta in streams[0]:
                yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, GenerationDelta | None, BaseException | None]] = asyncio.Queue(_MERGE_QUEUE)

    async def pump(i: int) -> None:
        try:
            if firsts[i] is not None:
                await queue.put((i, firsts[i], None))
                async for delta in streams[i]:
                    await queue.put((i, delta, None))
            await queue.put((i, None, None))
        except Exception as exc:
            await queue.put((i, None, exc))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    try:
        running = len(tasks)
        while running:
            i, delta, error = await queue.get()
            if error is not None:
                raise error
            if delta is None:
                running -= 1
            else:
                yield i, delta
    finally:  # the client left or a generation failed: stop the others (cancelling aborts them in the engine)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(streams)


def completions_router(
    config: MmragConfig,
    pipeline: ChatPipeline,
    metrics: IngressMetrics,
    *,
    require_json: Callable[[Request], None],
    read_body: Callable[[Request], Awaitable[bytes]],
) -> APIRouter:
    """``/v1/completions`` over the pipeline's backend (its LLM), with the app's body rules."""
    router = APIRouter(tags=["completions"])

    @router.post("/v1/completions", openapi_extra=documented(CompletionRequest))
    async def create_completion(http_request: Request) -> Response:
        return await observed(metrics, "completions", lambda start: _complete(http_request, start))

    async def _complete(http_request: Request, start: float) -> Response:
        require_json(http_request)
        body = await read_body(http_request)
        if len(body) <= INLINE_PARSE_BYTES:
            request = parse_completion_body(body, config)
        else:
            request = await pipeline.offload.run(parse_completion_body, body, config)
        check_completion_limits(request, config)
        completion_id = new_completion_id()
        streams = [pipeline.backend.generate(g) for g in generation_requests(request, completion_id, config)]
        firsts = await first_outputs(streams)
        metrics.ttft.observe(time_since(start))
        state = CompletionState(request)
        ids = {"id": completion_id, "created": now(), "model": request.model}
        deltas = merged(streams, firsts)
        if request.stream:
            events = sse_events(state, deltas, ids, metrics, start)
            return StreamThenCall(events, media_type="text/event-stream", on_done=metrics.in_flight.dec)
        async for prompt_index, delta in deltas:
            state.add(prompt_index, delta)
        choices = [
            CompletionChoice(index=i, text=c.text, logprobs=c.logprobs, finish_reason=c.finish_reason)
            for i, c in sorted(state.choices.items())
        ]
        usage = state.usage()
        metrics.observe_usage(usage)
        return JSONResponse(Completion(**ids, choices=choices, usage=usage).model_dump())

    return router


def time_since(start: float) -> float:
    return time.perf_counter() - start


async def sse_events(
    state: CompletionState,
    deltas: AsyncIterator[tuple[int, GenerationDelta]],
    ids: dict,
    metrics: IngressMetrics,
    start: float,
) -> AsyncIterator[str]:
    """``text_completion`` chunks, one per delta; with ``stream_options.include_usage`` a last chunk with no
    choices and the usage; an error after the start is a last event; then ``[DONE]``."""
    options = state.request.stream_options
    try:
        async for prompt_index, delta in deltas:
            index, text, logprobs = state.add(prompt_index, delta)
            choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=delta.finish_reason)
            yield _sse(Completion(**ids, choices=[choice]).model_dump())
        if options is not None and options.include_usage:
            yield _sse(Completion(**ids, choices=[], usage=state.usage()).model_dump())
    except OpenAIError as exc:
        yield _sse(exc.to_dict())
    except Exception:
        logger.exception("error while streaming a completion")
        yield _sse(OpenAIError("internal server error").to_dict())
    finally:
        metrics.observe_usage(state.usage())
        metrics.latency.observe(time_since(start))
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
