"""OpenAI legacy completions (``/v1/completions``) request and response shapes, validated strictly.

As on chat, unknown top-level fields are ignored and OpenAI's fields that would change the answer and that
mmrag does not implement are a 400 naming the field: ``suffix`` (insertion needs a model trained for it) and
``best_of`` other than ``n`` (server-side best-of ranking). ``logit_bias`` and vLLM's sampling extras
(``min_p``, ``top_k``, ``repetition_penalty``) are chat's; ``echo`` with ``logprobs`` scores the prompt's tokens
too (vLLM's prompt log-probabilities), in OpenAI's legacy shape.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from mmrag.serving.openai.protocol import SamplingExtras, StreamOptions, Usage, stop_sequences, validation_limits

# OpenAI's legacy default: a completion of 16 tokens unless the request says otherwise.
DEFAULT_MAX_TOKENS = 16
# OpenAI's legacy cap on ``logprobs`` (chat's ``top_logprobs`` goes to 20).
MAX_LOGPROBS = 5


class CompletionRequest(SamplingExtras):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    prompt: str | list[str] = Field(description="A text, or a list of texts each completed with `n` choices.")
    max_tokens: int | None = Field(
        default=DEFAULT_MAX_TOKENS, ge=1, description="16 when absent (OpenAI's default); null: what fits."
    )
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    best_of: int | None = Field(default=None, ge=1, description="Only equal to `n` (no server-side ranking).")
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = Field(default=False, description="Each choice's text starts with its prompt.")
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Log-probabilities of each token and the k likeliest (with `echo`, the prompt's tokens too).",
    )
    suffix: str | None = Field(default=None, description="Refused when set: not supported.")
    user: str | None = Field(default=None, description="Accepted and ignored.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompts(cls, value: Any, info: ValidationInfo) -> Any:
        """Counted before validation; token-id arrays refused by name (``[1, 2]`` or ``[[1, 2]]``)."""
        if not isinstance(value, list):
            return value
        if not value:
            raise ValueError("at least one prompt is needed")
        if any(isinstance(item, int | list) for item in value):
            raise ValueError(
                "token-id prompts are not accepted: ids are tokenizer-specific (OpenAI clients send tiktoken "
                "ids, which are other tokens for this model); send the text"
            )
        limit = validation_limits(info).max_completion_prompts
        if len(value) > limit:
            raise ValueError(f"{len(value)} prompts; at most {limit} per request (limits.max_completion_prompts)")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str]:
        return stop_sequences(stop)

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if best_of is not None and best_of != n:
            raise ValueError(f"best_of={best_of} must equal n ({n}): choices are not ranked on the server")
        return best_of

    @field_validator("suffix")
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        if value:  # null and "" ask for nothing
            raise ValueError(f"`{info.field_name}` is not supported by this server")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: four lists, one entry per token of the choice's text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(
        default_factory=list, description="The `logprobs` likeliest tokens and the sampled one."
    )
    text_offset: list[int] = Field(default_factory=list, description="Where each token starts in `text`.")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"
