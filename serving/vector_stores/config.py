"""Configuration of the Vector Stores API (``vector_stores:``): where its records live and its limits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from mmrag.serving.retrieval.config import RetrievalConfig

# The questions the default model's projector was trained to answer about one image (``mmrag
# train-smol-vision``: "Image 1:", the image, then the question), which it answers with a word each; asked to
# "describe" an image it answers with anything but (measured on the shapes images: 0 of 6 right, 12 of 12
# for these two).
_TRAINED_QUESTIONS = {"smol": ("What colour is the shape in Image 1?", "What shape is in Image 1?")}
_GENERAL_QUESTIONS = ("Describe Image 1 in one short sentence.",)


class ImageDescriptionsConfig(BaseModel):
    """The served model's own description of an image file, asked for when the file is attached to a store."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(
        default=True,
        description="Ask the served model (the LLM deployment; in a process without one, the engine there, if "
        "any) to describe each image file attached to a vector store, and index the image by that description "
        "beside its name, alt text and attributes. Off, or with a text-only model, or when asking fails or "
        "times out: the image is indexed without it (the log says why); the file never fails for it.",
    )
    questions: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(
        default=None,
        min_length=1,
        max_length=4,
        description="What the model is asked, one greedy generation per question, each shown 'Image 1:' and the "
        "image before it; the answers, joined, are the description. None: for `smol` the two questions its "
        "projector was trained on (colour, shape), for any other model 'Describe Image 1 in one short sentence.'",
    )
    max_tokens: int = Field(default=24, gt=0, le=256, description="Tokens generated per question at most.")
    timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=600,
        description="Seconds one image's questions may take together (queueing at the LLM included); then the "
        "image is indexed without the model's description.",
    )
    max_side_px: int = Field(
        default=1024,
        ge=32,
        le=8192,
        description="An image larger than this on a side is scaled down (aspect kept) before it is sent to the "
        "model, which bounds what crosses to the LLM deployment (the model's processor resizes it anyway).",
    )

    def resolved_questions(self, model_name: str) -> tuple[str, ...]:
        if self.questions is not None:
            return tuple(self.questions)
        return _TRAINED_QUESTIONS.get(model_name, _GENERAL_QUESTIONS)


class VectorStoresConfig(BaseModel):
    """Vector stores share the retriever's Milvus and encoder; their chunks live in one collection."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool | None = Field(
        default=None,
        description="Serve /v1/vector_stores and `retrieval.vector_store_ids`. The records and ingestion jobs belong "
        "to one process: the retriever replica, or with several retriever replicas on Milvus Lite served by "
        "`mmrag serve` (retrieval.milvus_lite_server), one more replica of its own (the VectorStores deployment), "
        "which the retriever replicas forward to. None: on, except with several retriever replicas on a Milvus "
        "server, where they are off and true is a configuration error (the replicas may be on other machines than "
        "the records and uploaded files).",
    )
    collection: str = Field(
        default="mmrag_vector_stores",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$",
        description="The Milvus collection holding every store's chunks (partitioned by `vector_store_id`).",
    )
    num_partitions: int = Field(
        default=16, gt=0, le=1024, description="Milvus partitions the store ids are hashed into."
    )
    records_path: str | None = Field(
        default=None,
        description="SQLite file of the stores and their files. None: `vector_stores.sqlite3` beside the "
        "Milvus Lite file, or in the mmrag cache directory for a Milvus server.",
    )
    ingest_workers: int = Field(default=1, gt=0, le=16, description="Files indexed at once, per retriever.")
    embed_batch: int = Field(default=64, gt=0, description="Chunks encoded and written per Milvus upsert.")
    max_files_per_batch: int = Field(default=500, gt=0, le=2000, description="Files per file batch request.")
    max_chunks_per_file: int = Field(
        default=20000, gt=0, description="A file that parses into more chunks fails (`invalid_file`)."
    )
    max_queries: int = Field(default=8, gt=0, description="Query strings per search request.")
    max_stores_per_search: int = Field(
        default=8, gt=0, description="Stores one chat request may name in `retrieval.vector_store_ids`."
    )
    max_retrieved_images: int = Field(
        default=4,
        ge=0,
        le=64,
        description="Image files a chat request's search may put into the prompt as images (best hits first); "
        "they count against `limits.max_images_per_request` with the request's own images, and the image hits "
        "beyond either limit are listed in `retrieval.documents` with why they were left out. 0: none.",
    )
    min_image_score: float | None = Field(
        default=0.2,
        ge=-1.0,
        le=1.0,
        description="An image hit is shown to the model only when its dense similarity is at least this (COSINE "
        "or IP; not applied to hybrid search's RRF scores nor to an L2 index): an image costs hundreds of tokens, "
        "and a small model takes any picture in its prompt for the subject, so a weak match stays out (with the "
        "bundled MiniLM an unrelated image's description scores under 0.1, a matching one 0.4 to 0.7; another "
        "encoder may need another floor). None: no floor.",
    )
    image_descriptions: ImageDescriptionsConfig = Field(
        default_factory=ImageDescriptionsConfig,
        description="The served model's description of an image file, indexed with it (at ingestion).",
    )
    poll_after_ms: int = Field(
        default=250,
        gt=0,
        description="The `openai-poll-after-ms` hint sent with an in-progress file (the SDK's poll interval).",
    )

    def resolved_records_path(self, retrieval: RetrievalConfig) -> Path:
        if self.records_path is not None:
            return Path(self.records_path)
        lite = retrieval.lite_path()
        if lite is not None:
            return lite.with_name(lite.stem + ".vector_stores.sqlite3")
        from mmrag.serving.paths import cache_dir

        return cache_dir() / "vector_stores.sqlite3"


def vector_stores_enabled(config: Any) -> bool:
    """Whether the server of ``config`` (an ``MmragConfig``, not imported: it imports this module) serves
    vector stores (see ``enabled``); raises for true with several retriever replicas on a Milvus server."""
    enabled = config.vector_stores.enabled
    if not several_retrievers(config) or config.retrieval.shares_lite():
        return enabled is not False
    if enabled:
        raise ValueError(
            "vector_stores.enabled needs one retriever replica (deployments.retriever) on a Milvus server: the stores' "
            "records and ingestion jobs belong to one process (several replicas work on Milvus Lite served by "
            "`mmrag serve`, retrieval.milvus_lite_server)"
        )
    return False


def several_retrievers(config: Any) -> bool:
    """Whether the retriever deployment of ``config`` may run more than one replica."""
    retriever = config.deployments.retriever
    return (retriever.autoscaling.max_replicas if retriever.autoscaling else retriever.num_replicas) > 1


def separate_vector_stores(config: Any) -> bool:
    """Whether the vector stores run in a deployment of their own (one replica) that the retriever replicas
    forward to: they are on and the retriever may run several replicas."""
    return several_retrievers(config) and vector_stores_enabled(config)
