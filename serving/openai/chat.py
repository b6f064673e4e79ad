"""From a validated OpenAI chat request to a :class:`GenerationRequest`, and from deltas back to responses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.protocol import GenerationDelta, GenerationRequest, SamplingOptions
from mmrag.serving.engine.protocol import TokenLogprob as EngineTokenLogprob
from mmrag.serving.media import ImagePolicy, load_image
from mmrag.serving.openai.errors import InvalidRequestError, ModelNotFoundError
from mmrag.serving.openai.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    CompressionUsage,
    Delta,
    ImagePart,
    ResponseMessage,
    TokenLogprob,
    TopLogprob,
    Usage,
)


async def prepare_generation(request: ChatCompletionRequest, config: MmragConfig, request_id: str) -> GenerationRequest:
    """Check the request against the server's limits, fetch its images, and build the engine input."""
    check_limits(request, config)
    image_urls = [
        (f"messages[{i}].content[{j}].image_url.url", part.image_url.url)
        for i, message in enumerate(request.messages)
        if isinstance(message.content, list)
        for j, part in enumerate(message.content)
        if isinstance(part, ImagePart)
    ]
    policy = ImagePolicy.from_limits(config.limits)
    images = await asyncio.gather(*(load_image(url, policy, param=param) for param, url in image_urls))
    return GenerationRequest(
        request_id=request_id,
        messages=[template_message(m) for m in request.messages],
        images=list(images),
        sampling=sampling_options(request),
        aim_keep_ratio=request.compression.aim_keep_ratio if request.compression else None,
        lookm=request.compression.lookm if request.compression else None,
    )


def check_limits(request: ChatCompletionRequest, config: MmragConfig) -> None:
    limits = config.limits
    if request.model != config.model.served_name:
        raise ModelNotFoundError(request.model)
    if len(request.messages) > limits.max_messages:
        raise InvalidRequestError(f"at most {limits.max_messages} messages per request", param="messages")
    if request.n > limits.max_n:
        raise InvalidRequestError(f"n must be at most {limits.max_n}", param="n")
    if request.n > 1 and request.temperature == 0:
        raise InvalidRequestError("n > 1 needs temperature > 0 (greedy choices would be equal)", param="n")
    cap = limits.max_completion_tokens
    if cap is not None and (request.completion_limit or 0) > cap:
        field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise InvalidRequestError(f"{field} must be at most {cap}", param=field)
    num_images = sum(
        isinstance(p, ImagePart) for m in request.messages if isinstance(m.content, list) for p in m.content
    )
    if num_images > limits.max_images_per_request:
        raise InvalidRequestError(
            f"{num_images} images in the request; at most {limits.max_images_per_request} are accepted",
            param="messages",
        )


def template_message(message: ChatMessage) -> dict[str, Any]:
    """OpenAI message -> chat-template message (``image_url`` parts become bare ``{"type": "image"}``)."""
    role = "system" if message.role == "developer" else message.role
    if not isinstance(message.content, list):
        return {"role": role, "content": message.content or ""}
    parts = [
        {"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text} for p in message.content
    ]
    return {"role": role, "content": parts}


def sampling_options(request: ChatCompletionRequest) -> SamplingOptions:
    return SamplingOptions(
        max_tokens=request.completion_limit,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=tuple(request.stop or ()),
        n=request.n,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
    )


# JSON has no -inf; a token the model gives no probability gets this floor (OpenAI's own convention).
_LOGPROB_FLOOR = -9999.0


def _top_logprob(token: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=token, logprob=max(logprob, _LOGPROB_FLOOR), bytes=list(token.encode("utf-8")))


def logprob_entries(logprobs: tuple[EngineTokenLogprob, ...]) -> list[TokenLogprob]:
    return [
        TokenLogprob(
            **_top_logprob(t.token, t.logprob).model_dump(), top_logprobs=[_top_logprob(*top) for top in t.top]
        )
        for t in logprobs
    ]


def usage_of(delta: GenerationDelta | None) -> Usage:
    prompt = delta.prompt_tokens if delta else 0
    completion = delta.completion_tokens if delta else 0
    counts = delta.compression if delta else None
    extension = (
        CompressionUsage(
            visual_tokens_before=counts.visual_before,
            visual_tokens_after=counts.visual_after,
            kv_tokens_prompt=counts.kv_prompt,
            kv_tokens_kept=counts.kv_kept,
        )
        if counts
        else None
    )
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion, mmrag=extension)


async def collect_completion(
    deltas: AsyncIterator[GenerationDelta], *, n: int, completion_id: str, created: int, model: str
) -> ChatCompletion:
    texts = [""] * n
    logprobs: list[list[TokenLogprob] | None] = [None] * n
    finish: list[str | None] = [None] * n
    last: GenerationDelta | None = None
    retrieval = None
    async for delta in deltas:
        retrieval = retrieval or delta.retrieval
        texts[delta.index] += delta.text
        if delta.logprobs is not None:
            logprobs[delta.index] = (logprobs[delta.index] or []) + logprob_entries(delta.logprobs)
        finish[delta.index] = delta.finish_reason or finish[delta.index]
        last = delta
    choices = [
        Choice(
            index=i,
            message=ResponseMessage(content=texts[i]),
            finish_reason=finish[i],
            logprobs=ChoiceLogprobs(content=logprobs[i]) if logprobs[i] is not None else None,
        )
        for i in range(n)
    ]
    return ChatCompletion(
        id=completion_id, created=created, model=model, choices=choices, usage=usage_of(last), retrieval=retrieval
    )


def chunk_of(
    delta: GenerationDelta, *, first: bool, completion_id: str, created: int, model: str
) -> ChatCompletionChunk:
    choice = ChunkChoice(
        index=delta.index,
        delta=Delta(role="assistant" if first else None, content=delta.text),
        finish_reason=delta.finish_reason,
        logprobs=ChoiceLogprobs(content=logprob_entries(delta.logprobs)) if delta.logprobs is not None else None,
    )
    return ChatCompletionChunk(
        id=completion_id, created=created, model=model, choices=[choice], retrieval=delta.retrieval
    )


def usage_chunk(last: GenerationDelta | None, *, completion_id: str, created: int, model: str):
    return ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[], usage=usage_of(last))
