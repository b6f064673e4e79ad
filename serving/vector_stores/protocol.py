"""Request and response shapes of the Vector Stores API, as the ``openai`` SDK sends and reads them.

Requests are strict (an unknown field is a 400 naming it, as on chat completions); responses are plain
dicts built by the service in OpenAI's shapes (``vector_store``, ``vector_store.file``,
``vector_store.files_batch``, the search page).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

# OpenAI's bounds: 16 pairs, keys of 64 characters, string values of 512.
MAX_PAIRS = 16
Key = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]
AttributeValue = bool | int | float | Annotated[str, StringConstraints(max_length=512)]
Metadata = dict[Key, MetadataValue]
Attributes = dict[Key, AttributeValue]
MAX_QUERY_CHARS = 4000
FileId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _bounded_pairs(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and len(value) > MAX_PAIRS:
        raise ValueError(f"at most {MAX_PAIRS} key-value pairs")
    for item in (value or {}).values():
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError("numbers must be finite")
    return value


class ExpiresAfter(_Strict):
    anchor: Literal["last_active_at"]
    days: int = Field(ge=1, le=365)


class StaticChunking(_Strict):
    max_chunk_size_tokens: int = Field(ge=100, le=4096)
    chunk_overlap_tokens: int = Field(ge=0)

    @model_validator(mode="after")
    def _overlap_at_most_half(self) -> StaticChunking:
        if self.chunk_overlap_tokens > self.max_chunk_size_tokens // 2:
            raise ValueError("chunk_overlap_tokens must not exceed half of max_chunk_size_tokens")
        return self


class AutoChunkingStrategy(_Strict):
    type: Literal["auto"]


class StaticChunkingStrategy(_Strict):
    type: Literal["static"]
    static: StaticChunking


ChunkingStrategy = Annotated[AutoChunkingStrategy | StaticChunkingStrategy, Field(discriminator="type")]


class CreateStore(_Strict):
    name: str | None = Field(default=None, max_length=256)
    description: str | None = Field(default=None, max_length=512)
    file_ids: list[FileId] | None = Field(default=None, max_length=500)
    chunking_strategy: ChunkingStrategy | None = None
    expires_after: ExpiresAfter | None = None
    metadata: Metadata | None = None

    _pairs = field_validator("metadata")(_bounded_pairs)


KeyId = Annotated[str, StringConstraints(pattern=r"^key-[0-9a-f]{32}$")]  # access.key_id of an API key


class UpdateStore(_Strict):
    name: str | None = Field(default=None, max_length=256)
    expires_after: ExpiresAfter | None = None
    metadata: Metadata | None = None
    mmrag_shared_with: list[KeyId] | None = Field(
        default=None,
        max_length=1000,
        description="mmrag's extension, admin keys only: the key ids (`key-` and the first 32 hex digits of the "
        "key's SHA-256) that may read and search this store besides its owner; the whole list, [] or null: none.",
    )

    _pairs = field_validator("metadata")(_bounded_pairs)


class AttachFile(_Strict):
    file_id: FileId
    attributes: Attributes | None = None
    chunking_strategy: ChunkingStrategy | None = None

    _pairs = field_validator("attributes")(_bounded_pairs)


class UpdateFile(_Strict):
    attributes: Attributes | None

    _pairs = field_validator("attributes")(_bounded_pairs)


class CreateBatch(_Strict):
    file_ids: list[FileId] | None = Field(default=None, min_length=1)
    files: list[AttachFile] | None = Field(default=None, min_length=1)
    attributes: Attributes | None = None
    chunking_strategy: ChunkingStrategy | None = None

    _pairs = field_validator("attributes")(_bounded_pairs)

    @model_validator(mode="after")
    def _one_list(self) -> CreateBatch:
        if (self.file_ids is None) == (self.files is None):
            raise ValueError("give exactly one of file_ids and files")
        return self

    def attachments(self) -> list[AttachFile]:
        if self.files is not None:
            return self.files
        return [
            AttachFile(file_id=f, attributes=self.attributes, chunking_strategy=self.chunking_strategy)
            for f in self.file_ids or []
        ]


class RankingOptions(_Strict):
    ranker: Literal["none", "auto", "default-2024-11-15"] | None = None
    score_threshold: float | None = Field(default=None, ge=0, le=1)


class Search(_Strict):
    query: str | list[str]
    filters: dict[str, Any] | None = None  # checked by filters.to_milvus (which knows the nesting bound)
    max_num_results: int = Field(default=10, ge=1, le=50)
    ranking_options: RankingOptions | None = None
    rewrite_query: bool = False

    @field_validator("query")
    @classmethod
    def _queries(cls, query: str | list[str]) -> str | list[str]:
        queries = [query] if isinstance(query, str) else query
        if not queries or not all(q.strip() for q in queries):
            raise ValueError("a non-empty query (or a non-empty list of them)")
        if any(len(q) > MAX_QUERY_CHARS for q in queries):
            raise ValueError(f"a query has at most {MAX_QUERY_CHARS} characters")
        return query

    @field_validator("rewrite_query")
    @classmethod
    def _no_rewrite(cls, value: bool) -> bool:
        # No model rewrites queries here; saying so beats searching for a query the client did not mean.
        if value:
            raise ValueError("query rewriting is not supported by this server; send false or omit it")
        return value

    def queries(self) -> list[str]:
        return [self.query] if isinstance(self.query, str) else self.query


class ListQuery(_Strict):
    """Cursor pagination of OpenAI list endpoints."""

    limit: int = Field(default=20, ge=1, le=100)
    order: Literal["asc", "desc"] = "desc"
    after: str | None = Field(default=None, max_length=128)
    before: str | None = Field(default=None, max_length=128)
    filter: Literal["in_progress", "completed", "failed", "cancelled"] | None = None


def chunking_object(chunk_tokens: int, overlap_tokens: int) -> dict[str, Any]:
    """What a file reports: always ``static`` with the sizes actually used (``auto`` resolves to ours)."""
    return {
        "type": "static",
        "static": {"max_chunk_size_tokens": chunk_tokens, "chunk_overlap_tokens": overlap_tokens},
    }


def list_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
