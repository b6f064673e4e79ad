"""Retrieval: Milvus store, encoders, chunking, ingestion, and the chat extension for text RAG.

Light to import (configuration, errors and protocol models only); the store and encoders import
pymilvus and torch when used.
"""

from mmrag.serving.retrieval.config import RetrievalConfig
from mmrag.serving.retrieval.errors import (
    CollectionNotFoundError,
    EncoderMismatchError,
    InvalidFilterError,
    RetrievalError,
    RetrievalRequestError,
    RetrievalTimeoutError,
    RetrievalUnavailableError,
    StoreUnreachableError,
    UnknownCollectionError,
    UnsupportedModeError,
)
from mmrag.serving.retrieval.protocol import (
    RetrievalInfo,
    RetrievalOptions,
    RetrievalResult,
    build_text_rag_messages,
    query_text_from_messages,
)

__all__ = [
    "CollectionNotFoundError",
    "EncoderMismatchError",
    "InvalidFilterError",
    "RetrievalConfig",
    "RetrievalError",
    "RetrievalInfo",
    "RetrievalOptions",
    "RetrievalRequestError",
    "RetrievalResult",
    "RetrievalTimeoutError",
    "RetrievalUnavailableError",
    "StoreUnreachableError",
    "UnknownCollectionError",
    "UnsupportedModeError",
    "build_text_rag_messages",
    "query_text_from_messages",
]
