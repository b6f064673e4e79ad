"""``POST /v1/embeddings``: vectors from the retriever's own encoder, so a framework indexes with the vectors
this server retrieves with.

The retriever replica embeds the texts as ingestion embeds documents (the same encoder object, the document
prefix, in its worker thread), so an input's vector equals the one Milvus stores for the same chunk text.
What is accepted, and why the rest is a 400 naming its field:

- ``input``: a string or a list of strings, none empty, at most ``limits.max_embedding_inputs`` of them and
  ``limits.max_embedding_input_chars`` characters each. Token arrays are refused: OpenAI's clients send
  tiktoken ids (LangChain does unless ``check_embedding_ctx_length=False``), which for this encoder's
  vocabulary are other words, so their vectors would be meaningless without any error. Text longer than the
  encoder reads (MiniLM: 256 tokens) is cut there, as sentence-transformers does; ``usage`` counts the tokens
  read.
- ``model``: the configured encoder name (``minilm``) or the encoder's full name
  (``sentence-transformers/all-MiniLM-L6-v2``); anything else is a 404 on ``model``, as chat answers.
- ``encoding_format``: ``float``, or ``base64`` of the little-endian float32 bytes, as OpenAI encodes (the
  ``openai`` SDK asks for base64 unless told otherwise).
- ``dimensions``: only the encoder's own (MiniLM: 384); an encoder that cannot shorten its vectors must not
  pretend to.
- ``user`` is accepted and ignored; unknown fields are ignored, as on chat.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from mmrag.serving.config import MmragConfig
from mmrag.serving.metrics import IngressMetrics
from mmrag.serving.openai.observed import observed
from mmrag.serving.openai.protocol import json_object, validated, validation_limits
from mmrag.serving.openai.vector_stores_api import documented
from mmrag.serving.pipeline import INLINE_PARSE_BYTES, ChatPipeline, reject_lone_surrogates

if TYPE_CHECKING:
    from mmrag.serving.retrieval.retriever import Embeddings

# Responses for up to this many vectors are written on the event loop (MiniLM: about 8 KB of JSON each);
# larger ones in a worker thread.
INLINE_RESPONSE_VECTORS = 8


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, description="The encoder: its configured name (`minilm`) or its full name.")
    input: str | list[str] = Field(description="A text or a list of texts (token arrays are refused).")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="`base64`: the little-endian float32 bytes of each vector."
    )
    dimensions: int | None = Field(default=None, ge=1, description="Only the encoder's own dimension.")
    user: str | None = Field(default=None, description="Accepted and ignored.")

    @field_validator("input", mode="before")
    @classmethod
    def _texts_within_limits(cls, value: Any, info: ValidationInfo) -> Any:
        """Counted and measured before any is validated; token arrays refused by name."""
        limits = validation_limits(info)
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list):
            return value  # pydantic names the type error
        if not texts:
            raise ValueError("at least one input is needed")
        if len(texts) > limits.max_embedding_inputs:
            raise ValueError(f"{len(texts)} inputs; at most {limits.max_embedding_inputs} per request")
        for i, text in enumerate(texts):
            if isinstance(text, int | list):
                raise ValueError(
                    "token arrays are not accepted: their ids would be another tokenizer's (OpenAI clients "
                    "send tiktoken ids), meaningless to this encoder; send the text (LangChain's "
                    "OpenAIEmbeddings: check_embedding_ctx_length=False)"
                )
            if isinstance(text, str):
                if not text:
                    raise ValueError(f"input[{i}] is empty")
                if len(text) > limits.max_embedding_input_chars:
                    raise ValueError(
                        f"input[{i}] has {len(text)} characters; at most {limits.max_embedding_input_chars} "
                        "(limits.max_embedding_input_chars)"
                    )
        return value

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


def parse_embedding_body(body: bytes, config: MmragConfig) -> EmbeddingRequest:
    """A body -> a validated request; every refusal a 400 naming the field."""
    payload = json_object(body)
    if b"\\u" in body:
        reject_lone_surrogates(payload)  # the tokenizer would fail on one deep inside the retriever
    # A bad item of a list input is the input's fault: clients look for `input`.
    return validated(EmbeddingRequest, payload, config.limits, whole=("input",))


def embedding_response(request: EmbeddingRequest, embeddings: Embeddings) -> bytes:
    """The response body (built in a worker thread for large requests: 2048 vectors of floats as JSON take
    a while to write)."""
    vectors = embeddings.vectors.astype("<f4", copy=False)
    if request.encoding_format == "base64":
        data: list[Any] = [base64.b64encode(vector.tobytes()).decode("ascii") for vector in vectors]
    else:
        data = vectors.tolist()  # float32 values as doubles: a client's float32 of each is the same value
    tokens = sum(embeddings.tokens)
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": item} for i, item in enumerate(data)],
        "model": embeddings.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def embeddings_router(
    config: MmragConfig,
    pipeline: ChatPipeline,
    metrics: IngressMetrics,
    *,
    require_json: Callable[[Request], None],
    read_body: Callable[[Request], Awaitable[bytes]],
) -> APIRouter:
    """``/v1/embeddings`` over the pipeline's backend (its retriever), with the app's body rules."""
    router = APIRouter(tags=["embeddings"])
    offload = pipeline.offload

    @router.post("/v1/embeddings", openapi_extra=documented(EmbeddingRequest))
    async def create_embeddings(http_request: Request) -> Response:
        return await observed(metrics, "embeddings", lambda _: _embed(http_request))

    async def _embed(http_request: Request) -> Response:
        require_json(http_request)
        body = await read_body(http_request)
        if len(body) <= INLINE_PARSE_BYTES:
            request = parse_embedding_body(body, config)
        else:
            request = await offload.run(parse_embedding_body, body, config)
        texts = request.texts
        embeddings = await pipeline.backend.embed(texts, model=request.model, dimensions=request.dimensions)
        metrics.embedding_inputs.inc(len(texts))
        metrics.embedding_tokens.inc(sum(embeddings.tokens))
        if len(texts) <= INLINE_RESPONSE_VECTORS:
            content = embedding_response(request, embeddings)
        else:
            content = await offload.run(embedding_response, request, embeddings)
        return Response(content, media_type="application/json")

    return router
