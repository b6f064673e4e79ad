"""From engine deltas to OpenAI chat responses: whole completions, stream chunks and usage."""

from __future__ import annotations

from collections.abc import AsyncIterator

from mmrag.serving.engine.protocol import GenerationDelta, ToolCallChunk
from mmrag.serving.engine.protocol import TokenLogprob as EngineTokenLogprob
from mmrag.serving.openai.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    CompressionUsage,
    Delta,
    FunctionCallDelta,
    FunctionCallOut,
    ResponseMessage,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
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
    calls: list[dict[int, ToolCall]] = [{} for _ in range(n)]
    last: GenerationDelta | None = None
    retrieval = None
    async for delta in deltas:
        retrieval = retrieval or delta.retrieval
        texts[delta.index] += delta.text
        for piece in delta.tool_calls or ():
            _add_call_piece(calls[delta.index], piece)
        if delta.logprobs is not None:
            logprobs[delta.index] = (logprobs[delta.index] or []) + logprob_entries(delta.logprobs)
        finish[delta.index] = delta.finish_reason or finish[delta.index]
        last = delta
    choices = [
        Choice(
            index=i,
            message=ResponseMessage(
                content=texts[i] if texts[i] or not calls[i] else None,
                tool_calls=[calls[i][k] for k in sorted(calls[i])] or None,
            ),
            finish_reason=finish[i],
            logprobs=ChoiceLogprobs(content=logprobs[i]) if logprobs[i] is not None else None,
        )
        for i in range(n)
    ]
    return ChatCompletion(
        id=completion_id, created=created, model=model, choices=choices, usage=usage_of(last), retrieval=retrieval
    )


def _add_call_piece(calls: dict[int, ToolCall], piece: ToolCallChunk) -> None:
    """A streamed piece of a call into the whole call (the first piece names it, the rest add arguments)."""
    call = calls.get(piece.index)
    if call is None:
        calls[piece.index] = ToolCall(
            id=piece.id or "", function=FunctionCallOut(name=piece.name or "", arguments=piece.arguments)
        )
    else:
        call.function.arguments += piece.arguments


def _tool_call_deltas(pieces: tuple[ToolCallChunk, ...] | None) -> list[ToolCallDelta] | None:
    if not pieces:
        return None
    return [
        ToolCallDelta(
            index=p.index,
            id=p.id,
            type="function" if p.id is not None else None,
            function=FunctionCallDelta(name=p.name, arguments=p.arguments),
        )
        for p in pieces
    ]


def chunk_of(
    delta: GenerationDelta, *, first: bool, completion_id: str, created: int, model: str
) -> ChatCompletionChunk:
    calls = _tool_call_deltas(delta.tool_calls)
    choice = ChunkChoice(
        index=delta.index,
        # A tool-call answer has no text: content stays null, as OpenAI's.
        delta=Delta(
            role="assistant" if first else None,
            content=None if delta.tool_calls is not None else delta.text,
            tool_calls=calls,
        ),
        finish_reason=delta.finish_reason,
        logprobs=ChoiceLogprobs(content=logprob_entries(delta.logprobs)) if delta.logprobs is not None else None,
    )
    return ChatCompletionChunk(
        id=completion_id, created=created, model=model, choices=[choice], retrieval=delta.retrieval
    )


def usage_chunk(last: GenerationDelta | None, *, completion_id: str, created: int, model: str):
    return ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[], usage=usage_of(last))
