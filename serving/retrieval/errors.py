"""Typed retrieval errors, each carrying the HTTP status the ingress should answer with.

Two families: the request is wrong (4xx, the client should change it) or the store is not serving
(503, retry later, or degraded away by ``retrieval.on_failure: degrade``). Every error pickles with its
fields intact, because it crosses a Ray Serve handle from the retriever replica to the ingress.
"""

from __future__ import annotations


class RetrievalError(Exception):
    """Base class. ``status_code`` is the HTTP status; ``field`` names the request field at fault."""

    status_code: int = 500
    degradable: bool = False

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message, field)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class RetrievalRequestError(RetrievalError):
    """The request's retrieval options are invalid (400)."""

    status_code = 400


class InvalidFilterError(RetrievalRequestError):
    """Milvus rejected the filter expression; the message is Milvus's own (which column, what)."""

    def __init__(self, message: str, field: str | None = "retrieval.filter") -> None:
        super().__init__(message, field)


class UnsupportedModeError(RetrievalRequestError):
    """A retrieval mode this server cannot serve yet (``xrag`` until its projector lands)."""

    def __init__(self, message: str, field: str | None = "retrieval.mode") -> None:
        super().__init__(message, field)


class EncoderMismatchError(RetrievalRequestError):
    """The collection was filled by another encoder: its vectors and ours are not comparable.

    In a request it is a 400 on ``retrieval.collection``; at ingestion it is a refusal to write.
    """

    def __init__(self, message: str, field: str | None = "retrieval.collection") -> None:
        super().__init__(message, field)


class RetrievalUnavailableError(RetrievalError):
    """The store cannot serve now (503): unreachable, collection missing, or too slow."""

    status_code = 503
    degradable = True


class StoreUnreachableError(RetrievalUnavailableError):
    """Milvus did not answer (connection refused, Lite file locked by another process, ...)."""


class CollectionNotFoundError(RetrievalUnavailableError):
    """The collection does not exist (nothing ingested yet, or a name that was never created)."""

    def __init__(self, message: str, field: str | None = "retrieval.collection") -> None:
        super().__init__(message, field)


class RetrievalTimeoutError(RetrievalUnavailableError):
    """Encoding + search took longer than ``retrieval.search_timeout_s``."""
