"""The retrieval entry point of a chat request: options + query text -> chunks and response info.

Faults (store unreachable, collection missing, timeout) either raise their 503-type error or, with
``retrieval.on_failure: degrade``, return an empty result marked ``degraded`` with the reason. Request
errors (bad filter, too large ``top_k``, ``xrag``, encoder mismatch) always raise their 400-type error.
Nothing waits longer than ``search_timeout_s``: a lost connection is re-opened by a later request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmrag.serving.errors import InvalidRequestError, ModelNotFoundError
from mmrag.serving.retrieval.config import RetrievalConfig
from mmrag.serving.retrieval.encoders import Encoder, load_encoder
from mmrag.serving.retrieval.errors import (
    CollectionNotFoundError,
    EncoderMismatchError,
    RetrievalError,
    RetrievalRequestError,
    RetrievalTimeoutError,
    StoreUnreachableError,
    UnknownCollectionError,
)
from mmrag.serving.retrieval.protocol import (
    ResolvedOptions,
    RetrievalInfo,
    RetrievalOptions,
    RetrievalResult,
    RetrievedChunk,
    RetrievedDocument,
    bounded_query,
    resolve_options,
)
from mmrag.serving.retrieval.store import MilvusStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embeddings:
    """``/v1/embeddings``' answer from the retriever: one vector per input, as ingestion stores documents."""

    model: str
    """The encoder's name (the one its collections record)."""
    vectors: np.ndarray
    """``float32[inputs, dim]``."""
    tokens: list[int]
    """Tokens the encoder read per input: special tokens included, at most its ``max_tokens``."""


class Retriever:
    """Owns the encoder and a (re)connecting Milvus store. Thread-safe; one per replica."""

    def __init__(self, config: RetrievalConfig, encoder: Encoder | None = None) -> None:
        self.config = config
        self.encoder = encoder or load_encoder(config.encoder)
        self._check_projector()
        self._store: MilvusStore | None = None
        self._checked: set[str] = set()  # collections whose recorded encoder matched ours
        self._xrag_checked: set[str] = set()  # collections whose xrag_vector encoder matched the projector's
        self._lock = threading.Lock()

    # -- the request path --------------------------------------------------------------------

    async def retrieve(
        self, options: RetrievalOptions | dict | None, query_text: str, scope: tuple[str, str] | None = None
    ) -> RetrievalResult:
        """Retrieve for one chat request. Raises a ``RetrievalError`` (see ``errors.py``) or degrades.

        ``scope``: (collection, filter) of the vector stores the request named, searched instead of its
        collection (the request's own filter still applies); its hits name their file."""
        resolved = resolve_options(options, self.config)
        if scope is not None:
            where = f"({scope[1]}) and ({resolved.filter})" if resolved.filter else scope[1]
            resolved = resolved.model_copy(update={"collection": scope[0], "filter": where})
        info = RetrievalInfo(
            mode=resolved.mode,
            mode_fallback=resolved.mode_fallback,
            collection=resolved.collection,
            hybrid=resolved.hybrid,
        )
        # Cut again here: a caller other than the pipeline (a batch stage) may pass the whole message.
        query_text = bounded_query(query_text, self.config.max_query_chars)
        if resolved.mode == "none" or not query_text.strip():
            return RetrievalResult(info=info)
        if not is_valid_unicode(query_text):  # the tokenizer and gRPC would fail on it deep inside
            raise RetrievalRequestError("the query text is not valid Unicode (lone surrogates)", field="messages")
        try:
            chunks = await asyncio.wait_for(
                asyncio.to_thread(self.search, resolved, query_text), timeout=self.config.search_timeout_s
            )
        except CollectionNotFoundError as error:
            if resolved.collection != self.config.collection:  # the client named it: its mistake, not a fault
                raise UnknownCollectionError(error.message) from error
            return self._degrade_or_raise(error, info)
        except asyncio.TimeoutError:
            error: RetrievalError = RetrievalTimeoutError(
                f"retrieval took longer than {self.config.search_timeout_s} s"
            )
            return self._degrade_or_raise(error, info)
        except RetrievalError as error:
            return self._degrade_or_raise(error, info)
        info.documents = [
            RetrievedDocument(
                id=c.id,
                score=c.score,
                source=c.source,
                **({"file_id": c.metadata.get("file_id"), "filename": c.metadata.get("filename")} if scope else {}),
            )
            for c in chunks
        ]
        return RetrievalResult(chunks=chunks, info=info)

    def search(self, options: ResolvedOptions, query_text: str) -> list[RetrievedChunk]:
        """Blocking search (runs in a worker thread on the request path)."""
        vector = self.encoder.encode([query_text], is_query=True)[0].tolist()
        store = self._connected()
        try:
            self._check_collection(store, options.collection)
            # xRAG reads the vectors its projector was trained on: the xRAG field if there is one, else the
            # retrieval encoder's own (dense) field.
            vectors = None if options.mode != "xrag" else ("xrag" if self.config.xrag_encoder else "dense")
            if vectors == "xrag":
                self._check_xrag_field(store, options.collection)
            hits = store.search(
                options.collection, vector, query_text, options.top_k, options.filter, options.hybrid, vectors
            )
        except StoreUnreachableError:
            self._disconnect(store)
            raise
        except CollectionNotFoundError:
            self._checked.discard(options.collection)
            self._xrag_checked.discard(options.collection)
            raise
        return [
            RetrievedChunk(id=h.id, score=h.score, text=h.text, source=h.source, metadata=h.metadata, vector=h.vector)
            for h in hits
        ]

    # -- /v1/embeddings ---------------------------------------------------------------------------

    def embedding_model_names(self) -> tuple[str, ...]:
        """What a request's ``model`` may say: the configured encoder name (``minilm``) or its full name
        (``sentence-transformers/all-MiniLM-L6-v2``, as collections record it)."""
        return tuple(dict.fromkeys((self.config.encoder.name, self.encoder.name)))

    async def embed(self, texts: Sequence[str], *, model: str, dimensions: int | None = None) -> Embeddings:
        """Embed ``texts`` as ingestion embeds documents (the document prefix), so a vector equals the one
        Milvus stores for the same chunk text. Checks come first; encoding runs in a worker thread."""
        if model not in self.embedding_model_names():
            raise ModelNotFoundError(model)
        if dimensions is not None and dimensions != self.encoder.dim:
            raise InvalidRequestError(
                f"dimensions={dimensions}: {self.encoder.name} makes {self.encoder.dim}-d vectors and cannot "
                "shorten them (it was not trained to, as Matryoshka encoders are); omit dimensions",
                param="dimensions",
            )
        return await asyncio.to_thread(self._embed, list(texts))

    def _embed(self, texts: list[str]) -> Embeddings:
        # One encoder batch per call: the encoder's lock is released between batches, so a large request
        # does not hold up the chat retrievals of this replica for all of its inputs. Batches are the ones
        # encode() would make itself, so the vectors are the same.
        step = self.config.encoder.batch_size
        vectors = np.concatenate(
            [self.encoder.encode(texts[start : start + step]) for start in range(0, len(texts), step)]
        )
        prefix = self.config.encoder.document_prefix
        read = [
            min(len(self.encoder.token_spans(prefix + text)) + self.encoder.special_tokens, self.encoder.max_tokens)
            for text in texts
        ]
        return Embeddings(model=self.encoder.name, vectors=vectors, tokens=read)

    def _degrade_or_raise(self, error: RetrievalError, info: RetrievalInfo) -> RetrievalResult:
        if not (error.degradable and self.config.on_failure == "degrade"):
            raise error
        logger.warning("retrieval degraded: %s", error)
        info.degraded = True
        info.degraded_reason = f"{type(error).__name__}: {error.public_message}"  # the response shows it
        return RetrievalResult(info=info)

    def _check_projector(self) -> None:
        """Refuse, at start, an xRAG projector trained on another encoder's vectors than xRAG will read.

        Without ``xrag_encoder`` xRAG reads the dense field (this encoder); with it, the collection's
        ``xrag_vector`` field, whose encoder each collection records (checked by ``_check_xrag_field``).
        """
        if self.config.xrag.projector is None or self.config.xrag_encoder is not None:
            return
        from mmrag.serving.xrag.projector import read_card

        read_card(self.config.xrag.projector).check(encoder=self.encoder.name, encoder_dim=self.encoder.dim)

    def _check_xrag_field(self, store: MilvusStore, collection: str) -> None:
        """The collection's ``xrag_vector`` field must hold the vectors the projector was trained on."""
        if collection in self._xrag_checked:
            return
        from mmrag.serving.xrag.projector import ProjectorMismatchError, read_card

        props = store.properties(collection)
        recorded = (props.get("mmrag.xrag_encoder"), props.get("mmrag.xrag_dim"))
        try:
            read_card(self.config.xrag.projector).check(encoder=recorded[0], encoder_dim=int(recorded[1] or 0))
        except ProjectorMismatchError as exc:
            raise EncoderMismatchError(f"collection {collection!r}: {exc}") from exc
        self._xrag_checked.add(collection)

    # -- the store -------------------------------------------------------------------------------

    def store(self) -> MilvusStore:
        """The connected store (connecting if needed); raises ``StoreUnreachableError``."""
        return self._connected()

    def _connected(self) -> MilvusStore:
        with self._lock:
            if self._store is None:
                self._store = MilvusStore(self.config)
            return self._store

    def _disconnect(self, store: MilvusStore) -> None:
        with self._lock:
            if self._store is not store:
                return
            self._store = None
        self._checked.clear()
        self._xrag_checked.clear()
        try:
            store.close()
        except Exception:  # already broken: closing is best effort
            logger.debug("closing a broken Milvus connection failed", exc_info=True)

    def check_collection(self, collection: str) -> None:
        """Raise ``EncoderMismatchError`` if ``collection`` was filled by another encoder (or a 503-type
        error if it cannot be read); the deployment calls it on the default collection at start-up."""
        self._check_collection(self._connected(), collection)

    def _check_collection(self, store: MilvusStore, collection: str) -> None:
        if collection not in self._checked:
            store.check_encoder(collection, self.encoder)
            self._checked.add(collection)

    def check_health(self) -> None:
        """Raise if the store cannot answer (a cheap list-collections call)."""
        try:
            self._connected().list_collections()
        except StoreUnreachableError:
            if self._store is not None:
                self._disconnect(self._store)
            raise

    def close(self) -> None:
        if self._store is not None:
            self._disconnect(self._store)


def is_valid_unicode(text: str) -> bool:
    """False for text holding lone surrogates (JSON's ``"\\ud800"`` decodes to one), which UTF-8 cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
