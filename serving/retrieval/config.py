"""Configuration of the retrieval stage: where Milvus is, how the collection is indexed, how text is
chunked and encoded, how retrieved chunks enter the prompt, and what a fault does to a request.

Every field has a default, so an empty ``retrieval:`` section is a working retriever: a Milvus Lite file
under the mmrag cache directory, the bundled all-MiniLM-L6-v2 encoder, an HNSW index.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

RetrievalMode = Literal["none", "text", "xrag"]


class _Strict(BaseModel):
    """Unknown keys are errors (the same rule as the root config)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EncoderConfig(_Strict):
    """A text encoder: a registered name, or a sentence-transformers model directory."""

    name: str = Field(
        default="minilm",
        description="Registered encoder name ('minilm': the bundled all-MiniLM-L6-v2) or 'local' with `path`.",
    )
    path: str | None = Field(
        default=None,
        description="A sentence-transformers model directory (config.json, tokenizer, 1_Pooling/); "
        "required when name is 'local'.",
    )
    batch_size: int = Field(default=32, gt=0, description="Texts per forward pass.")
    device: str = Field(default="cpu", description="torch device of the encoder.")
    query_prefix: str = Field(
        default="", description="Prepended to queries (some encoders, e.g. E5, expect 'query: ')."
    )
    document_prefix: str = Field(default="", description="Prepended to documents at ingestion.")

    @model_validator(mode="after")
    def _local_needs_path(self) -> EncoderConfig:
        if self.name == "local" and not self.path:
            raise ValueError("encoder name 'local' needs `path` (a sentence-transformers directory)")
        return self


class IndexConfig(_Strict):
    """The dense vector index. HNSW is approximate; FLAT is exact (and linear in the corpus)."""

    type: Literal["HNSW", "FLAT", "IVF_FLAT", "AUTOINDEX"] = Field(
        default="HNSW", description="Milvus index type of the dense field."
    )
    metric: Literal["COSINE", "IP", "L2"] = Field(
        default="COSINE", description="Similarity metric; scores are higher-is-better except L2."
    )
    hnsw_m: int = Field(default=16, ge=2, le=2048, description="HNSW: links per node.")
    hnsw_ef_construction: int = Field(default=200, gt=0, description="HNSW: build-time beam width.")
    hnsw_ef: int = Field(default=64, gt=0, description="HNSW: search beam width (raised to top_k when smaller).")
    ivf_nlist: int = Field(default=128, gt=0, description="IVF_FLAT: number of clusters.")
    ivf_nprobe: int = Field(default=16, gt=0, description="IVF_FLAT: clusters visited per search.")

    def build_params(self) -> dict[str, int]:
        if self.type == "HNSW":
            return {"M": self.hnsw_m, "efConstruction": self.hnsw_ef_construction}
        if self.type == "IVF_FLAT":
            return {"nlist": self.ivf_nlist}
        return {}

    def search_params(self, top_k: int) -> dict[str, int]:
        if self.type == "HNSW":
            return {"ef": max(self.hnsw_ef, top_k)}
        if self.type == "IVF_FLAT":
            return {"nprobe": self.ivf_nprobe}
        return {}


class ChunkingConfig(_Strict):
    """Token-aware chunking, counted in the encoder's tokens."""

    chunk_tokens: int = Field(
        default=200, gt=0, description="Tokens per chunk; must fit the encoder's max sequence length."
    )
    overlap_tokens: int = Field(default=40, ge=0, description="Tokens shared by consecutive chunks.")

    @model_validator(mode="after")
    def _overlap_smaller(self) -> ChunkingConfig:
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError("overlap_tokens must be smaller than chunk_tokens")
        return self


class TextRagConfig(_Strict):
    """How retrieved chunks enter the prompt in `text` mode (see ``protocol.build_text_rag_messages``)."""

    placement: Literal["system", "user"] = Field(
        default="system",
        description="'system': into the system message (merged into a leading one, else inserted first); "
        "'user': prepended to the last user message (for chat templates without a system role).",
    )
    instruction: str = Field(
        default=(
            "Answer the question using the documents below when they are relevant, and cite them by "
            "number, like [1]. If the documents do not contain the answer, say so."
        ),
        description="Text placed before the numbered documents.",
    )
    document_template: str = Field(
        default="[{number}] (source: {source})\n{text}",
        description="One retrieved chunk; fields: number (1-based rank), source, text, id, score.",
    )
    max_context_tokens: int = Field(
        default=1024,
        gt=0,
        description="Upper bound, in LLM tokens, of the inserted context (instruction + documents). "
        "The caller may lower it further to what fits max_model_len.",
    )
    min_partial_tokens: int = Field(
        default=32,
        ge=0,
        description="The last chunk that does not fit whole is cut to the remaining budget only if at "
        "least this many of its tokens fit; otherwise it is dropped.",
    )


class XragConfig(_Strict):
    """xRAG mode: each retrieved chunk enters the prompt as one `<xrag>` token carrying its projected vector."""

    projector: str | None = Field(
        default=None,
        description="Directory of an xRAG projector (`mmrag train-projector`) trained for this encoder and "
        "this LLM; checked against both when the LLM starts. None: no xRAG on this server.",
    )
    on_unavailable: Literal["error", "text"] = Field(
        default="error",
        description="A request for `xrag` with no projector configured: 'error' answers 400; 'text' serves "
        "it as text RAG and says so in the response's `retrieval.mode_fallback`.",
    )


class RetrievalConfig(_Strict):
    """The retriever: Milvus connection, collection, index, encoder, chunking, text RAG, faults."""

    uri: str | None = Field(
        default=None,
        description="Milvus: a Lite file ending in .db, or a server URI (http://host:19530). "
        "None: a Lite file `milvus.db` under the mmrag cache directory.",
    )
    milvus_lite_server: bool = Field(
        default=True,
        description="On Milvus Lite (uri unset or a .db path): `mmrag serve` runs the Lite data directory as a "
        "local Milvus Lite server process on loopback (a free port, recorded in `<path>.server.json`), which its "
        "retriever replicas (any number), `mmrag ingest` and batch jobs share while it runs. false: each process "
        "opens the directory itself, one process at a time (then one retriever replica, and stop the server to "
        "ingest). Either mode reads the same directory.",
    )
    lite_server_uri: str | None = Field(
        default=None,
        description="The Milvus Lite server serving the Lite path (http://127.0.0.1:PORT): set by `mmrag serve` "
        "for its replicas, which then never open the directory themselves. Unset: a process uses the server "
        "recorded in `<path>.server.json` while it runs, else opens the directory.",
    )
    token: str | None = Field(
        default=None,
        description="Milvus server credentials ('user:password' or an API key). None: $MMRAG_MILVUS_TOKEN "
        "if set (how a Kubernetes Secret reaches the pods), else none.",
    )
    db_name: str = Field(default="", description="Milvus database ('' : the server's default).")
    collection: str = Field(
        default="mmrag_docs", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$", description="Default collection."
    )
    allowed_collections: list[str] | None = Field(
        default=None,
        description="Collections a request may name besides the default one; None: any collection on the "
        "Milvus instance (a request naming another gets a 400 on retrieval.collection).",
    )
    default_mode: RetrievalMode = Field(
        default="text",
        description="Mode of chat requests that carry no `retrieval` extension ('none': retrieve only when "
        "a request asks).",
    )
    top_k: int = Field(default=4, gt=0, le=100, description="Chunks retrieved per request by default.")
    max_query_chars: int = Field(
        default=2000,
        gt=0,
        description="The search query (the last user message's text) is cut to its first this many characters: "
        "the encoder reads only its first few hundred tokens anyway, and BM25 and the encoder stay fast.",
    )
    max_top_k: int = Field(default=50, gt=0, le=16384, description="Largest `top_k` a request may ask.")
    full_text: bool = Field(
        default=True,
        description="Collections that mmrag creates get a BM25 full-text index (an analyzed `text` field, a "
        "`sparse` field filled by a Milvus BM25 function), which `hybrid` search needs. false: a dense-only "
        "layout for a Milvus without BM25 functions and sparse vectors (2.3, 2.4). Applies when a collection is "
        "created; each records its layout, and a hybrid search on a dense-only one is a 400 on retrieval.hybrid.",
    )
    hybrid: bool = Field(default=False, description="Default of `hybrid`: dense + BM25 full-text fused with RRF.")
    rrf_k: int = Field(default=60, gt=0, description="RRF constant: score = sum 1 / (rrf_k + rank).")
    index: IndexConfig = Field(default_factory=IndexConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig)
    text_rag: TextRagConfig = Field(default_factory=TextRagConfig)
    xrag_encoder: EncoderConfig | None = Field(
        default=None,
        description="A second encoder whose vectors (the xRAG projector's input space) fill the "
        "`xrag_vector` field at ingestion. None: xRAG reads the dense field (the projector was trained on "
        "the retrieval encoder's own vectors).",
    )
    xrag: XragConfig = Field(default_factory=XragConfig)
    connect_timeout_s: float = Field(default=5.0, gt=0, description="Connecting to Milvus.")
    search_timeout_s: float = Field(default=5.0, gt=0, description="One retrieval (encode + search), end to end.")
    write_timeout_s: float = Field(default=120.0, gt=0, description="One upsert/delete/create call.")
    on_failure: Literal["error", "degrade"] = Field(
        default="error",
        description="On Milvus unreachable, the default collection missing or timeout: 'error' answers 503; "
        "'degrade' answers without retrieval and says why in the response's `retrieval` field (a collection "
        "the request names that does not exist is always a 404).",
    )
    ingest_demo_corpus: bool = Field(
        default=True,
        description="`mmrag serve` ingests the bundled demo corpus into the default collection on "
        "first run (idempotent).",
    )

    @model_validator(mode="after")
    def _top_k_within_cap(self) -> RetrievalConfig:
        if self.top_k > self.max_top_k:
            raise ValueError("top_k must be <= max_top_k")
        return self

    @model_validator(mode="after")
    def _hybrid_needs_full_text(self) -> RetrievalConfig:
        if self.hybrid and not self.full_text:
            raise ValueError("hybrid: true needs full_text: true (hybrid search fuses dense and BM25 full-text hits)")
        return self

    def resolved_uri(self) -> str:
        if self.uri is not None:
            return self.uri
        from mmrag.serving.paths import cache_dir

        return str(cache_dir() / "milvus.db")

    def resolved_token(self) -> str | None:
        return self.token if self.token is not None else os.environ.get("MMRAG_MILVUS_TOKEN") or None

    def is_lite(self) -> bool:
        return self.resolved_uri().endswith(".db")

    def lite_path(self) -> Path | None:
        return Path(self.resolved_uri()) if self.is_lite() else None

    def shares_lite(self) -> bool:
        """Whether the Lite path is served by a Lite server process that any number of processes share (set
        by ``mmrag serve`` once it started one), rather than opened in one process."""
        return self.is_lite() and self.lite_server_uri is not None
