"""Typed retrieval errors, each carrying the HTTP status the ingress should answer with.

Two families: the request is wrong (4xx, the client should change it) or the store is not serving
(503, retry later, or degraded away by ``retrieval.on_failure: degrade``). Every error pickles with its
fields intact, because it crosses a Ray Serve handle from the retriever replica to the ingress.

``message`` is for the server's log and the CLI (it may name the Milvus URI or the Lite file);
``public_message`` is what an HTTP client is told: a 4xx's message is about the client's own input, a
503 says only what kind of fault it was.
"""

from __future__ import annotations


class RetrievalError(Exception):
    """Base class. ``status_code`` is the HTTP status; ``field`` names the request field at fault."""

    status_code: int = 500
    degradable: bool = False
    # What a client is told of a server-side fault (None: the message is client-facing).
    summary: str | None = "retrieval failed"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message, field)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message

    @property
    def public_message(self) -> str:
        return self.summary or self.message


class RetrievalRequestError(RetrievalError):
    """The request's retrieval options are invalid (400)."""

    status_code = 400
    summary = None


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


class UnknownCollectionError(RetrievalRequestError):
    """The request named a collection that does not exist (404): the client's mistake, never degraded."""

    status_code = 404

    def __init__(self, message: str, field: str | None = "retrieval.collection") -> None:
        super().__init__(message, field)


class RetrievalUnavailableError(RetrievalError):
    """The store cannot serve now (503): unreachable, collection missing, or too slow."""

    status_code = 503
    degradable = True
    summary = "the document store failed"


class StoreUnreachableError(RetrievalUnavailableError):
    """Milvus did not answer (connection refused, Lite file locked by another process, ...)."""

    summary = "the document store is unreachable"


class CollectionNotFoundError(RetrievalUnavailableError):
    """The collection does not exist (nothing ingested yet, or a name that was never created).

    A 503 when it is the server's default collection; the retriever turns it into an
    :class:`UnknownCollectionError` when the request named it.
    """

    summary = None  # "collection 'x' does not exist": the name is the server's or the client's own

    def __init__(self, message: str, field: str | None = "retrieval.collection") -> None:
        super().__init__(message, field)


class RetrievalTimeoutError(RetrievalUnavailableError):
    """Encoding + search took longer than ``retrieval.search_timeout_s``."""

    summary = "retrieval timed out"
