"""``tool_choice: auto``: the model answers in text or calls tools in its own format, which vLLM's tool-call parser
for it (``model.tool_call_parser``, any name ``vllm serve --tool-call-parser`` takes) reads back.

The parser is vLLM's own class, run here, in the process that reads the engine's deltas (the ingress, a batch
worker), over the served model's tokenizer: the same checkpoint the engine loads, its tokenizer files only.
Importing vLLM's parsers and loading the tokenizer take seconds (vLLM's import alone took 10-25 s on the
2-core test machine), so they start in a worker thread when the pipeline is built, and a request waits for them
only if it comes first. Each request gets its own parser instance (parsers keep streaming state), one per choice.

Whole answers are read once, at the end (``extract_tool_calls``); streams are read delta by delta
(``extract_tool_calls_streaming``), as vLLM's server does: text goes out as content as soon as the parser lets
it (it holds back what may be the start of a call marker), calls as OpenAI sends them: a first piece with the
index, id, type and name, then the arguments in fragments. A choice that called finishes with ``tool_calls``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mmrag.serving.engine.protocol import GenerationDelta, SamplingOptions, TokenLogprob, ToolCallChunk
from mmrag.serving.errors import ServiceUnavailableError, clip
from mmrag.serving.openai.tools import new_call_id

if TYPE_CHECKING:
    from mmrag.serving.config import ModelConfig

logger = logging.getLogger(__name__)

__all__ = ["ToolCallParsing"]


@dataclass(frozen=True)
class _Loaded:
    parser_class: Any  # a vllm.tool_parsers.ToolParser subclass
    tokenizer: Any


def _load(name: str, model: ModelConfig) -> _Loaded:
    """vLLM's parser class and the served model's tokenizer (blocking: seconds)."""
    from vllm.tokenizers import get_tokenizer
    from vllm.tool_parsers import ToolParserManager

    from mmrag.serving.models.registry import model_path

    return _Loaded(ToolParserManager.get_tool_parser(name), get_tokenizer(model_path(model)))


class ToolCallParsing:
    """The configured parser, loading in the background from construction on."""

    def __init__(self, name: str, model: ModelConfig):
        self.name = name
        self._future: Future[_Loaded] = Future()
        # Its own thread: the import must not hold one of the request pool's workers for seconds.
        threading.Thread(target=self._load, args=(model,), name="mmrag-tool-parser", daemon=True).start()

    def _load(self, model: ModelConfig) -> None:
        try:
            self._future.set_result(_load(self.name, model))
        except BaseException as exc:  # a request that needs the parser raises it
            logger.exception("tool-call parser %s could not be loaded", self.name)
            self._future.set_exception(exc)

    async def _loaded(self) -> _Loaded:
        try:
            return await asyncio.wrap_future(self._future)
        except Exception as exc:  # logged once where it failed; every request that needs it is told
            raise ServiceUnavailableError(
                f"the tool-call parser {self.name!r} (model.tool_call_parser) could not be loaded: {clip(str(exc))}",
                param="tool_choice",
            ) from exc

    async def sampling(self, tools: list[dict[str, Any]], sampling: SamplingOptions) -> SamplingOptions:
        """``sampling`` as the parser asks for it (vLLM's ``adjust_request``: e.g. Hermes keeps special tokens in
        the text, where some models' call markers are); token ids on every delta, for parsers that read them."""
        loaded = await self._loaded()
        request = _vllm_request(tools)
        request = loaded.parser_class(loaded.tokenizer, request.tools).adjust_request(request)
        return dataclasses.replace(sampling, skip_special_tokens=request.skip_special_tokens, return_token_ids=True)

    async def deltas(
        self,
        deltas: AsyncIterator[GenerationDelta],
        tools: list[dict[str, Any]],
        *,
        stream: bool,
        parallel: bool = True,
    ) -> AsyncIterator[GenerationDelta]:
        """The engine's deltas with each choice's answer read as text or calls; ``parallel`` False
        (``parallel_tool_calls: false``) keeps each choice's first call only, as the model's format cannot be held
        to one."""
        loaded = await self._loaded()
        request = _vllm_request(tools)
        choices: dict[int, _Choice] = {}
        async for delta in deltas:
            choice = choices.get(delta.index)
            if choice is None:
                choice = choices[delta.index] = _Choice(loaded.parser_class(loaded.tokenizer, request.tools))
            for piece in choice.feed(delta, request) if stream else choice.hold(delta, request):
                if not parallel and piece.tool_calls:
                    first = tuple(call for call in piece.tool_calls if call.index == 0)
                    if not first and piece.finish_reason is None and piece.retrieval is None:
                        continue
                    piece = dataclasses.replace(piece, tool_calls=first)
                yield piece


@dataclass
class _Choice:
    """One choice's parser and what it has been fed."""

    parser: Any
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of text the parser still holds back
    content: str = ""  # the text sent as content so far (streams)
    called: bool = False

    def hold(self, delta: GenerationDelta, request: Any) -> list[GenerationDelta]:
        """A whole answer: held until its finish, then read at once. Retrieval info goes out at once."""
        self.text += delta.text
        self.logprobs += delta.logprobs or ()
        if delta.finish_reason is None:
            return [_bare(delta)] if delta.retrieval is not None else []
        try:
            info = self.parser.extract_tool_calls(self.text, request)
        except Exception:  # a parser's bug must not lose the answer: it goes out as text
            logger.exception("tool-call parser %s failed on a whole answer", type(self.parser).__name__)
            info = None
        if info is None or not info.tools_called:
            return [self._text(delta, self.text, delta.finish_reason)]
        calls = tuple(
            ToolCallChunk(index=i, arguments=call.function.arguments, id=new_call_id(), name=call.function.name)
            for i, call in enumerate(info.tool_calls)
        )
        finish = "tool_calls" if delta.finish_reason == "stop" else delta.finish_reason
        self.logprobs = []  # which tokens were the text's is the parser's secret: none, rather than all
        content = [self._text(delta, info.content, None)] if info.content else []
        return _retrieval_once([*content, _bare(delta, tool_calls=calls, finish_reason=finish)])

    def feed(self, delta: GenerationDelta, request: Any) -> list[GenerationDelta]:
        """A stream: what the parser makes of this delta (nothing, text, call pieces or both), then the finish."""
        previous_text, previous_ids = self.text, list(self.token_ids)
        self.text += delta.text
        self.token_ids += delta.token_ids or ()
        self.logprobs += delta.logprobs or ()
        try:
            message = self.parser.extract_tool_calls_streaming(
                previous_text,
                self.text,
                delta.text,
                previous_ids,
                self.token_ids,
                list(delta.token_ids or ()),
                request,
            )
        except Exception:
            logger.exception("tool-call parser %s failed on a stream", type(self.parser).__name__)
            message = None
        out: list[GenerationDelta] = []
        content = message.content if message is not None and message.content else ""
        if delta.finish_reason is not None and not self.called and not (message is not None and message.tool_calls):
            # The answer ends with no call: text the parser held back (what might have begun a marker) is text.
            sent = self.content + content
            if self.text.startswith(sent):
                content += self.text[len(sent) :]
        if content:
            self.content += content
            out.append(self._text(delta, content, None))
        calls = [self._call_piece(call) for call in (message.tool_calls if message is not None else ())]
        if delta.finish_reason is not None and self.called:
            rest = self._unsent_arguments()
            if rest:
                calls.append(rest)
        if calls:
            self.called = True
            self.logprobs = []  # a call's tokens have no place in OpenAI's content log-probabilities
            out.append(_bare(delta, tool_calls=tuple(calls)))
        finish = delta.finish_reason
        if finish is not None:
            finish = "tool_calls" if finish == "stop" and self.called else finish
            if out:
                out[-1] = dataclasses.replace(out[-1], finish_reason=finish)
            else:
                out.append(_bare(delta, finish_reason=finish, tool_calls=() if self.called else None))
        elif not out and delta.retrieval is not None:
            out.append(_bare(delta))
        return _retrieval_once(out)

    def _call_piece(self, call: Any) -> ToolCallChunk:
        function = call.function
        name = getattr(function, "name", None) if function is not None else None
        arguments = (getattr(function, "arguments", None) if function is not None else None) or ""
        if isinstance(function, dict):  # some parsers hand the function over as a dumped dict
            name, arguments = function.get("name"), function.get("arguments") or ""
        first = call.id is not None or name is not None
        return ToolCallChunk(
            index=call.index, arguments=arguments, id=new_call_id() if first else None, name=name if first else None
        )

    def _unsent_arguments(self) -> ToolCallChunk | None:
        """Arguments the parser read but held back (vLLM's parsers keep the last call's closing part until they
        see the end); sent with the finish."""
        try:
            rest = self.parser.get_remaining_unstreamed_args()
        except Exception:
            return None
        return ToolCallChunk(index=len(self.parser.prev_tool_call_arr) - 1, arguments=rest) if rest else None

    def _text(self, delta: GenerationDelta, text: str, finish: str | None) -> GenerationDelta:
        """A text delta, with the log-probabilities of the text the parser has let go of so far."""
        logprobs = tuple(self.logprobs) if delta.logprobs is not None else None
        self.logprobs = []
        return dataclasses.replace(
            delta, text=text, finish_reason=finish, logprobs=logprobs, token_ids=None, tool_calls=None
        )


def _bare(delta: GenerationDelta, **fields: Any) -> GenerationDelta:
    """``delta``'s counts and retrieval info with no text of its own."""
    base = {"text": "", "finish_reason": None, "logprobs": None, "token_ids": None, "tool_calls": None}
    return dataclasses.replace(delta, **(base | fields))


def _retrieval_once(out: list[GenerationDelta]) -> list[GenerationDelta]:
    """Deltas made from one engine delta: its retrieval info on the first only."""
    return [out[0], *(dataclasses.replace(d, retrieval=None) for d in out[1:])] if out else out


def _vllm_request(tools: list[dict[str, Any]]) -> Any:
    """vLLM's request model, as its parsers take it: they read the tools (names, argument types) from it."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest(model="", messages=[], tools=tools, tool_choice="auto")
