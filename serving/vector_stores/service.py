"""OpenAI Vector Stores on Milvus, run inside the retriever replica (the process that owns the connection).

Mapping: every store's chunks live in **one** collection (``vector_stores.collection``) whose partition key
is ``vector_store_id``, not in a collection per store, because

- Milvus bounds collections (65,536 per instance by default, far fewer in practice: each has its own
  segments, index and load state, and Milvus Lite creates one in ~0.7 s), while stores are cheap and
  numerous (one per user, per thread); a partition key hashes any number of stores into a fixed set of
  partitions, and a search naming stores is pruned to theirs;
- a chat request may name several stores: one search with ``vector_store_id in [...]``, not one per store
  merged by scores;
- every store shares the server's encoder, so there is one encoder record to check (the collection's), not
  one per store; and deleting a store is one ``delete`` by expression instead of a ``drop``, which is as cheap
  at these sizes.

On Milvus before 2.3.10, whose upsert misroutes partition keys, ``vector_store_id`` is a plain scalar field
instead (``store.py``): the same filter, without the pruning.

Rows are the retrieval schema (``store.py``) plus ``vector_store_id`` and ``file_id``: ``source`` holds the
file name (what the text-RAG prompt shows) and ``metadata`` holds ``file_id``, ``filename``, ``chunk_index``,
the section's own metadata (a PDF page) and ``attributes`` (what search filters read). An image file is one
chunk, ``kind: "image"``, whose text describes it (:func:`image_description`: its name, alt text, attributes,
and what the served model says it shows, asked while it is indexed, ``describe.py``): a chat request that
retrieves it loads the file and shows the model the image (``serving/pipeline.py``).

Records (stores, attachments, batches) are in SQLite (``records.py`` says why). Ingestion runs in a thread
pool of this process: an attachment is ``in_progress`` until its chunks are all written and flushed, then
``completed`` in one transaction; on any failure its chunks are deleted and it is ``failed`` with
``last_error``. A crash leaves it ``in_progress`` with no job running: the next operation of a fresh
process (:meth:`VectorStoreService._sweep`, run before every operation) deletes its chunks and marks it
``failed`` ("interrupted"), so no half-indexed file is ever ``completed``. Searches skip the chunks of
attachments that are not completed (at most those being written right now, and those whose cleanup is
pending). Deleted files and stores are hidden at once and their chunks removed; a removal Milvus refused
is retried by the sweep.

Isolation: every public method takes ``owner``, the request's key id (``access.py``): with API keys a key
reaches only its own stores (and those an admin shared with it, read only), another's being a 404.

Limits: ``expires_after`` is recorded and reported (``expires_at``), but stores are not expired; records
are owned by one process, so a retriever with several replicas on a Milvus server must not serve vector
stores (they would each see their own records).
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mmrag.serving.config import MmragConfig
from mmrag.serving.errors import InvalidRequestError, NotFoundError, OpenAIError, ServiceUnavailableError, clip
from mmrag.serving.retrieval.chunking import chunk_text
from mmrag.serving.retrieval.errors import InvalidFilterError, RetrievalError
from mmrag.serving.retrieval.retriever import Retriever
from mmrag.serving.retrieval.store import MilvusStore, quote_string
from mmrag.serving.vector_stores import protocol as p
from mmrag.serving.vector_stores.access import Access, PermissionDeniedError
from mmrag.serving.vector_stores.describe import ImageDescriber
from mmrag.serving.vector_stores.filters import FilterError, to_milvus
from mmrag.serving.vector_stores.records import Records, encode, now
from mmrag.serving.vector_stores.sources import FileSource, TextSection, UnreadableFile

logger = logging.getLogger(__name__)

INTERRUPTED = "interrupted: the server stopped while this file was being indexed; attach it again"


class VectorStoreService:
    """Stores, attachments, batches and search. Every public method blocks: call it off the event loop.

    Each returns OpenAI's JSON object (a dict) or raises an ``OpenAIError`` (4xx as the client's mistake,
    503 when Milvus fails), which pickles across a Serve handle.
    """

    def __init__(
        self,
        config: MmragConfig,
        retriever: Retriever,
        files: FileSource | None = None,
        describer: ImageDescriber | None = None,
    ) -> None:
        self.config = config.vector_stores
        self.describer = describer  # the served model's descriptions of image files (None: without them)
        self.retrieval = config.retrieval
        self.core = retriever
        self.collection = self.config.collection
        self.records = Records(self.config.resolved_records_path(config.retrieval))
        self.access = Access(key.get_secret_value() for key in config.server.admin_api_keys)
        self.files = files or FileSource(config)
        self._pool = ThreadPoolExecutor(self.config.ingest_workers, thread_name_prefix="vector-store-ingest")
        self._running: set[tuple[str, str]] = set()  # (store, file) with a job queued or running here
        self._lock = threading.Lock()
        self._collection_ready = False
        self.owner = self.records.try_own()
        if not self.owner:
            logger.warning("vector store records %s are written by another process: read-only here", self.records.path)
            return
        try:
            self._sweep()  # interrupted attachments are failed now, not at the first request
        except OpenAIError as exc:
            logger.warning("vector stores not swept at start (retried on first use): %s", exc.message)

    def close(self, wait: bool = True) -> None:
        """Stop taking jobs; ``wait``: let the running ones finish first (queued ones stay ``in_progress``, and
        the next process fails them as interrupted)."""
        self._pool.shutdown(wait=wait, cancel_futures=True)
        self.records.close()

    # -- stores ----------------------------------------------------------------------------------

    def create_store(self, body: p.CreateStore, owner: str | None = None) -> dict[str, Any]:
        """A new store owned by ``owner`` (the request's key id; None on a server without keys)."""
        self._writable()
        self._sweep()
        for i, file_id in enumerate(body.file_ids or []):  # every file exists, or no store is made
            self._filename(file_id, param=f"file_ids[{i}]", owner=owner)
        store_id = f"vs_{secrets.token_hex(12)}"
        created = now()
        self.records.execute(
            "INSERT INTO stores (id, created_at, last_active_at, name, description, metadata, expires_after, owner) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            store_id,
            created,
            created,
            body.name,
            body.description,
            encode(body.metadata or {}),
            encode(body.expires_after.model_dump() if body.expires_after else None),
            owner,
        )
        for file_id in dict.fromkeys(body.file_ids or []):
            self._attach(store_id, p.AttachFile(file_id=file_id, chunking_strategy=body.chunking_strategy))
        return self.get_store(store_id, owner=owner)

    def list_stores(self, query: p.ListQuery, owner: str | None = None) -> dict[str, Any]:
        self._sweep()
        visible, args = self.access.visible(owner)
        rows, more = self._page("stores", f"removed = 0 AND {visible}", args, query)
        return p.list_page([self._store_object(r, owner) for r in rows], more)

    def get_store(self, store_id: str, owner: str | None = None) -> dict[str, Any]:
        return self._store_object(self._store_row(store_id, owner=owner), owner)

    def update_store(self, store_id: str, body: p.UpdateStore, owner: str | None = None) -> dict[str, Any]:
        self._writable()
        self._store_row(store_id, owner=owner, write=True)
        fields = body.model_fields_set
        if "mmrag_shared_with" in fields:
            self._may_share(owner)
        with self.records.transaction() as db:
            if "name" in fields:
                db.execute("UPDATE stores SET name = ? WHERE id = ?", (body.name, store_id))
            if "metadata" in fields:
                db.execute("UPDATE stores SET metadata = ? WHERE id = ?", (encode(body.metadata or {}), store_id))
            if "expires_after" in fields:
                expires = encode(body.expires_after.model_dump() if body.expires_after else None)
                db.execute("UPDATE stores SET expires_after = ? WHERE id = ?", (expires, store_id))
            if "mmrag_shared_with" in fields:  # the whole list, as metadata is replaced whole
                db.execute("DELETE FROM shares WHERE vector_store_id = ?", (store_id,))
                for key in dict.fromkeys(body.mmrag_shared_with or []):
                    db.execute("INSERT INTO shares (vector_store_id, owner) VALUES (?, ?)", (store_id, key))
        return self.get_store(store_id, owner=owner)

    def delete_store(self, store_id: str, owner: str | None = None) -> dict[str, Any]:
        self._writable()
        self._store_row(store_id, owner=owner, write=True)
        with self.records.transaction() as db:
            db.execute("UPDATE stores SET removed = 1 WHERE id = ?", (store_id,))
            db.execute("UPDATE files SET removed = 1 WHERE vector_store_id = ?", (store_id,))
        self._sweep()
        return {"id": store_id, "object": "vector_store.deleted", "deleted": True}

    # -- files -----------------------------------------------------------------------------------

    def attach_file(self, store_id: str, body: p.AttachFile, owner: str | None = None) -> dict[str, Any]:
        self._writable()
        self._store_row(store_id, owner=owner, write=True)
        self._filename(body.file_id, owner=owner)  # a key attaches only its own uploads
        self._attach(store_id, body)
        return self.get_file(store_id, body.file_id, owner=owner)

    def list_files(
        self, store_id: str, query: p.ListQuery, batch_id: str | None = None, owner: str | None = None
    ) -> dict[str, Any]:
        self._store_row(store_id, owner=owner)
        where, args = "vector_store_id = ? AND removed = 0", [store_id]
        if batch_id is not None:
            self._batch_row(store_id, batch_id)
            where, args = where + " AND batch_id = ?", [*args, batch_id]
        if query.filter is not None:
            where, args = where + " AND status = ?", [*args, query.filter]
        rows, more = self._page("files", where, tuple(args), query, id_column="file_id")
        return p.list_page([_file_object(r) for r in rows], more)

    def get_file(self, store_id: str, file_id: str, owner: str | None = None) -> dict[str, Any]:
        self._store_row(store_id, owner=owner)
        return _file_object(self._file_row(store_id, file_id))

    def file_content(self, store_id: str, file_id: str, owner: str | None = None) -> dict[str, Any]:
        """The indexed chunks of a completed file, in order (none for a file that is not completed)."""
        self._store_row(store_id, owner=owner)
        row = self._file_row(store_id, file_id)
        texts: list[str] = []
        if row["status"] == "completed":
            store = self._store()
            step = self.config.embed_batch
            for start in range(0, self.config.max_chunks_per_file, step):
                ids = [_chunk_id(store_id, file_id, i) for i in range(start, start + step)]
                chunks = self._milvus(lambda ids=ids: store.get_rows(self.collection, ids, ["metadata", "text"]))
                texts += [c["text"] for c in sorted(chunks, key=lambda c: c["metadata"]["chunk_index"])]
                if len(chunks) < step:
                    break
        return {
            "object": "vector_store.file_content.page",
            "data": [{"type": "text", "text": text} for text in texts],
            "has_more": False,
            "next_page": None,
        }

    def update_file(self, store_id: str, file_id: str, body: p.UpdateFile, owner: str | None = None) -> dict[str, Any]:
        """New attributes: the records at once, the chunks (which filters read) rewritten in Milvus."""
        self._writable()
        self._store_row(store_id, owner=owner, write=True)
        row = self._file_row(store_id, file_id)
        if row["status"] == "in_progress":
            raise InvalidRequestError(
                "the file is still being indexed; update its attributes once it is completed",
                param="file_id",
                code="file_in_progress",
            )
        attributes = body.attributes or {}
        if row["status"] == "completed":
            store = self._store()
            fields = ["id", "text", "source", "metadata", "dense"]
            step = self.config.embed_batch
            for start in range(0, self.config.max_chunks_per_file, step):
                # Chunk ids are (store, file, index) hashes with contiguous indexes: read them back by id.
                ids = [_chunk_id(store_id, file_id, i) for i in range(start, start + step)]
                chunks = self._milvus(lambda ids=ids: store.get_rows(self.collection, ids, fields))
                for chunk in chunks:
                    chunk["metadata"] = {**chunk["metadata"], "attributes": attributes}
                    chunk |= {"vector_store_id": store_id, "file_id": file_id}
                    if chunk["metadata"].get("kind") == "image":  # an image is found by its attributes too
                        meta = chunk["metadata"]
                        text = image_description(
                            meta["filename"], attributes, meta.get("image_text", ""), meta.get("model_description", "")
                        )
                        chunk["text"] = _text_field(text)
                        chunk["dense"] = self.core.encoder.encode([chunk["text"]])[0].tolist()
                if chunks:
                    self._milvus(lambda chunks=chunks: store.upsert(self.collection, chunks))
                if len(chunks) < step:
                    break
            self._milvus(lambda: store.flush(self.collection))
        self.records.execute(
            "UPDATE files SET attributes = ? WHERE vector_store_id = ? AND file_id = ?",
            encode(attributes),
            store_id,
            file_id,
        )
        return self.get_file(store_id, file_id, owner=owner)

    def delete_file(self, store_id: str, file_id: str, owner: str | None = None) -> dict[str, Any]:
        self._writable()
        self._store_row(store_id, owner=owner, write=True)
        self._file_row(store_id, file_id)
        self.records.execute(
            "UPDATE files SET removed = 1 WHERE vector_store_id = ? AND file_id = ?", store_id, file_id
        )
        self._sweep()
        return {"id": file_id, "object": "vector_store.file.deleted", "deleted": True}

    # -- batches ---------------------------------------------------------------------------------

    def create_batch(self, store_id: str, body: p.CreateBatch, owner: str | None = None) -> dict[str, Any]:
        self._writable()
        self._store_row(store_id, owner=owner, write=True)
        attachments = body.attachments()
        if len(attachments) > self.config.max_files_per_batch:
            raise InvalidRequestError(
                f"at most {self.config.max_files_per_batch} files per batch", param="file_ids", code="too_many_files"
            )
        for i, attachment in enumerate(attachments):  # every file exists, or nothing is attached
            param = f"files[{i}].file_id" if body.files else f"file_ids[{i}]"
            self._filename(attachment.file_id, param=param, owner=owner)
        batch_id = f"vsfb_{secrets.token_hex(12)}"
        self.records.execute(
            "INSERT INTO batches (id, vector_store_id, created_at) VALUES (?, ?, ?)", batch_id, store_id, now()
        )
        for attachment in attachments:
            self._attach(store_id, attachment, batch_id)
        return self.get_batch(store_id, batch_id, owner=owner)

    def get_batch(self, store_id: str, batch_id: str, owner: str | None = None) -> dict[str, Any]:
        self._store_row(store_id, owner=owner)
        batch = self._batch_row(store_id, batch_id)
        counts = self._counts("batch_id = ?", batch_id)
        return {
            "id": batch_id,
            "object": "vector_store.files_batch",
            "created_at": batch["created_at"],
            "vector_store_id": store_id,
            "status": "in_progress" if counts["in_progress"] else "completed",
            "file_counts": counts,
        }

    # -- search ----------------------------------------------------------------------------------

    def search(self, store_id: str, body: p.Search, owner: str | None = None) -> dict[str, Any]:
        self._store_row(store_id, owner=owner)
        try:
            attribute_filter = to_milvus(body.filters) if body.filters is not None else None
        except FilterError as exc:
            raise InvalidRequestError(str(exc), param="filters", code="invalid_filter") from exc
        expression = self.scope_filter([store_id])
        if attribute_filter:
            expression = f"({expression}) and {attribute_filter}"
        threshold = body.ranking_options.score_threshold if body.ranking_options else None
        store = self._store()
        self._ensure_collection()  # a store with no file yet, on a fresh server: no hits, not a 503
        best: dict[str, Any] = {}
        queries = body.queries()
        if len(queries) > self.config.max_queries:
            raise InvalidRequestError(f"at most {self.config.max_queries} queries per search", param="query")
        vectors = self.core.encoder.encode(queries, is_query=True)
        for query, vector in zip(queries, vectors, strict=True):
            hits = self._milvus(
                lambda q=query, v=vector: store.search(
                    self.collection, v.tolist(), q, body.max_num_results, filter=expression
                ),
                param="filters",
            )
            for hit in hits:
                if hit.id not in best or hit.score > best[hit.id].score:
                    best[hit.id] = hit
        ranked = sorted(best.values(), key=lambda h: h.score, reverse=True)
        if threshold is not None:
            ranked = [h for h in ranked if h.score >= threshold]
        self._touch([store_id])
        return {
            "object": "vector_store.search_results.page",
            "search_query": queries,
            "data": [
                {
                    "file_id": h.metadata.get("file_id", ""),
                    "filename": h.metadata.get("filename", h.source),
                    "score": h.score,
                    "attributes": h.metadata.get("attributes") or {},
                    "content": [{"type": "text", "text": h.text}],
                }
                for h in ranked[: body.max_num_results]
            ],
            "has_more": False,
            "next_page": None,
        }

    def scope_filter(self, store_ids: list[str]) -> str:
        """The expression that limits a search to these stores' completed files (a failed file's chunks are
        deleted before its cleanup flag is cleared, so only these few can have chunks and be incomplete)."""
        ids = ", ".join(quote_string(s) for s in store_ids)
        expression = f"vector_store_id in [{ids}]"
        marks = ", ".join("?" * len(store_ids))
        partial = self.records.all(
            f"SELECT file_id FROM files WHERE vector_store_id IN ({marks}) "
            "AND (status = 'in_progress' OR removed = 1 OR cleanup = 1)",
            *store_ids,
        )
        if partial:
            skipped = ", ".join(quote_string(r["file_id"]) for r in partial)
            expression += f" and not (file_id in [{skipped}])"
        return expression

    def chat_scope(self, store_ids: list[str], owner: str | None = None) -> tuple[str, str]:
        """(collection, filter) for a chat request's ``retrieval.vector_store_ids``; 404 for an unknown store
        (or one ``owner`` may not read)."""
        if len(store_ids) > self.config.max_stores_per_search:
            raise InvalidRequestError(
                f"at most {self.config.max_stores_per_search} vector stores per request",
                param="retrieval.vector_store_ids",
            )
        for store_id in store_ids:
            self._store_row(store_id, param="retrieval.vector_store_ids", owner=owner)
        self._ensure_collection()
        self._touch(store_ids)
        return self.collection, self.scope_filter(store_ids)

    # -- ingestion -------------------------------------------------------------------------------

    def _attach(self, store_id: str, body: p.AttachFile, batch_id: str | None = None) -> None:
        """Record the attachment ``in_progress`` and queue its ingestion (an existing, not failed one stays)."""
        filename = self._filename(body.file_id)
        chunk_tokens, overlap = self._chunking(body.chunking_strategy)
        key = (store_id, body.file_id)
        with self._lock:
            if key in self._running:
                return  # being indexed (or removed) right now: the attachment stands as it is
            existing = self.records.one(
                "SELECT status, removed FROM files WHERE vector_store_id = ? AND file_id = ?", *key
            )
            if existing is not None and not existing["removed"] and existing["status"] != "failed":
                return
            self._running.add(key)
        try:
            if existing is not None:  # a failed or removed attachment: its chunks go before it is redone
                self._milvus(lambda: self._store().delete_where(self.collection, _file_expr(*key)))
            with self.records.transaction() as db:
                db.execute("DELETE FROM files WHERE vector_store_id = ? AND file_id = ?", key)
                db.execute(
                    "INSERT INTO files (vector_store_id, file_id, filename, created_at, status, attributes, "
                    "chunking, batch_id) VALUES (?, ?, ?, ?, 'in_progress', ?, ?, ?)",
                    (
                        *key,
                        filename,
                        now(),
                        encode(body.attributes or {}),
                        encode(p.chunking_object(chunk_tokens, overlap)),
                        batch_id,
                    ),
                )
            self._pool.submit(self._ingest, store_id, body.file_id, chunk_tokens, overlap)
        except BaseException:
            with self._lock:
                self._running.discard(key)
            raise

    def _ingest(self, store_id: str, file_id: str, chunk_tokens: int, overlap: int) -> None:
        key = (store_id, file_id)
        try:
            error: tuple[str, str] | None = None
            usage = 0
            try:
                usage = self._write_chunks(store_id, file_id, chunk_tokens, overlap)
            except UnreadableFile as exc:
                error = (exc.code, exc.message)
            except OpenAIError as exc:  # the file was deleted meanwhile (404), Milvus failed (503)
                error = ("invalid_file" if exc.status_code == 404 else "server_error", exc.message)
            except Exception as exc:
                logger.exception("indexing %s into %s failed", file_id, store_id)
                error = ("server_error", f"indexing failed ({type(exc).__name__})")
            with self.records.transaction() as db:
                row = db.execute("SELECT removed FROM files WHERE vector_store_id = ? AND file_id = ?", key).fetchone()
                if row is not None and not row["removed"] and error is None:
                    db.execute(
                        "UPDATE files SET status = 'completed', usage_bytes = ? "
                        "WHERE vector_store_id = ? AND file_id = ?",
                        (usage, *key),
                    )
                elif row is not None and not row["removed"]:
                    db.execute(
                        "UPDATE files SET status = 'failed', cleanup = 1, last_error = ? "
                        "WHERE vector_store_id = ? AND file_id = ?",
                        (encode({"code": error[0], "message": error[1][:2000]}), *key),
                    )
        finally:
            with self._lock:
                self._running.discard(key)
        try:
            self._sweep()  # a failed or removed attachment's chunks go now
        except OpenAIError as exc:
            logger.warning("cleanup after indexing %s deferred: %s", file_id, exc.message)

    def _write_chunks(self, store_id: str, file_id: str, chunk_tokens: int, overlap: int) -> int:
        filename = self._filename(file_id)
        attributes = self.records.one(
            "SELECT attributes FROM files WHERE vector_store_id = ? AND file_id = ?", store_id, file_id
        )
        attributes = (attributes or {}).get("attributes") or {}
        encoder = self.core.encoder
        rows: list[dict[str, Any]] = []
        for section in self.files.sections(file_id):
            if section.metadata.get("image"):  # an image file: one chunk, its description (see image_description)
                seen = self.describer.describe(section.image, filename) if self._describes(section) else None
                rows.append(_image_row(store_id, file_id, len(rows), filename, section.text, attributes, seen))
                continue
            for chunk in chunk_text(section.text, encoder.token_spans, chunk_tokens, overlap):
                index = len(rows)
                if index >= self.config.max_chunks_per_file:
                    raise UnreadableFile(
                        f"{filename}: more than {self.config.max_chunks_per_file} chunks "
                        "(vector_stores.max_chunks_per_file)"
                    )
                metadata = {**section.metadata, "file_id": file_id, "filename": filename, "chunk_index": index}
                rows.append(
                    {
                        "id": _chunk_id(store_id, file_id, index),
                        "vector_store_id": store_id,
                        "file_id": file_id,
                        "text": chunk.text,
                        "source": filename,
                        "metadata": {**metadata, "attributes": attributes},
                    }
                )
        if not rows:
            raise UnreadableFile(f"{filename}: no text to index")
        store = self._store()
        self._ensure_collection()
        usage = 0
        for start in range(0, len(rows), self.config.embed_batch):
            if not self._wanted(store_id, file_id):
                return 0  # deleted meanwhile: stop writing, the sweep removes what was written
            batch = rows[start : start + self.config.embed_batch]
            vectors = encoder.encode([r["text"] for r in batch])
            for row, vector in zip(batch, vectors, strict=True):
                row["dense"] = vector.tolist()
                usage += len(row["text"].encode()) + 4 * len(row["dense"])
            self._milvus(lambda b=batch: store.upsert(self.collection, b))
        self._milvus(lambda: store.flush(self.collection))
        return usage

    def _describes(self, section: TextSection) -> bool:
        return self.describer is not None and section.image is not None

    def _wanted(self, store_id: str, file_id: str) -> bool:
        row = self.records.one("SELECT removed FROM files WHERE vector_store_id = ? AND file_id = ?", store_id, file_id)
        return row is not None and not row["removed"]

    def _sweep(self) -> None:
        """Remove the chunks of every attachment that must not keep any: interrupted (``in_progress`` with no
        job here: marked failed), failed with cleanup pending, or deleted (then its record goes too)."""
        if not self.owner:
            return  # another process indexes: what is in progress there is not interrupted
        with self._lock:
            running = set(self._running)
        rows = self.records.all(
            "SELECT vector_store_id, file_id, status, removed, cleanup FROM files "
            "WHERE removed = 1 OR cleanup = 1 OR status = 'in_progress'"
        )
        rows = [r for r in rows if (r["vector_store_id"], r["file_id"]) not in running]
        stores = self.records.all("SELECT id FROM stores WHERE removed = 1")
        if not rows and not stores:
            return
        store = self._store()
        self._ensure_collection()
        interrupted = [r for r in rows if r["status"] == "in_progress" and not r["removed"]]
        if interrupted:  # failed first, chunks second: a crash in between leaves cleanup pending, not a 'completed'
            with self.records.transaction() as db:
                for r in interrupted:
                    logger.warning("vector store file %s in %s was interrupted", r["file_id"], r["vector_store_id"])
                    db.execute(
                        "UPDATE files SET status = 'failed', cleanup = 1, last_error = ? "
                        "WHERE vector_store_id = ? AND file_id = ? AND status = 'in_progress'",
                        (encode({"code": "server_error", "message": INTERRUPTED}), r["vector_store_id"], r["file_id"]),
                    )
        for r in rows:
            key = (r["vector_store_id"], r["file_id"])
            self._milvus(lambda k=key: store.delete_where(self.collection, _file_expr(*k)))
            with self.records.transaction() as db:
                if r["removed"]:
                    db.execute("DELETE FROM files WHERE vector_store_id = ? AND file_id = ? AND removed = 1", key)
                else:
                    db.execute("UPDATE files SET cleanup = 0 WHERE vector_store_id = ? AND file_id = ?", key)
        for s in stores:
            if any(k[0] == s["id"] for k in running):
                continue  # its last job is still writing; the sweep after that job removes the store
            self._milvus(
                lambda sid=s["id"]: store.delete_where(self.collection, f"vector_store_id == {quote_string(sid)}")
            )
            self.records.execute("DELETE FROM stores WHERE id = ? AND removed = 1", s["id"])

    # -- helpers ---------------------------------------------------------------------------------

    def _writable(self) -> None:
        if not self.owner:
            raise ServiceUnavailableError(
                "vector stores are managed by another process on these records (the server's retriever); "
                "this one only reads them",
                retry_after_s=60,
            )

    def _touch(self, store_ids: list[str]) -> None:
        if self.owner:
            stamp = now()
            for store_id in store_ids:
                self.records.execute("UPDATE stores SET last_active_at = ? WHERE id = ?", stamp, store_id)

    def _chunking(self, strategy: p.AutoChunkingStrategy | p.StaticChunkingStrategy | None) -> tuple[int, int]:
        """Token sizes for our chunker: ``auto`` is ``retrieval.chunking``; ``static`` is scaled down, overlap
        in proportion, to what the encoder embeds whole (it reads at most its own max length)."""
        if strategy is None or strategy.type == "auto":
            return self.retrieval.chunking.chunk_tokens, self.retrieval.chunking.overlap_tokens
        encoder = self.core.encoder
        limit = encoder.max_tokens - encoder.special_tokens
        size = min(strategy.static.max_chunk_size_tokens, limit)
        overlap = strategy.static.chunk_overlap_tokens * size // strategy.static.max_chunk_size_tokens
        return size, min(overlap, size // 2)

    def _filename(self, file_id: str, param: str = "file_id", owner: str | None = None) -> str:
        """The file's name; a 404 naming ``param`` for a missing file, or another key's (``owner`` a key id)."""
        try:
            return self.files.filename(file_id, owner=self.access.file_owner(owner))
        except NotFoundError as exc:
            raise NotFoundError(f"No such File object: {clip(file_id)}", param=param, code="file_not_found") from exc

    def _store_row(
        self, store_id: str, param: str = "vector_store_id", owner: str | None = None, write: bool = False
    ) -> dict[str, Any]:
        """The store ``owner`` may read (``write``: change); another key's is as missing as an unknown id."""
        visible, args = self.access.visible(owner)
        row = self.records.one(f"SELECT * FROM stores WHERE id = ? AND removed = 0 AND {visible}", store_id, *args)
        if row is None:
            raise NotFoundError(
                f"No vector store found with id {clip(store_id)}", param=param, code="vector_store_not_found"
            )
        if write and not self.access.unscoped(owner) and row["owner"] != owner:
            raise PermissionDeniedError(
                "this vector store is shared with your key to read and search; only its owner or an admin key "
                "may change it",
                param=param,
                code="vector_store_read_only",
            )
        return row

    def _may_share(self, owner: str | None) -> None:
        if owner is None:
            raise InvalidRequestError(
                "mmrag_shared_with: stores are shared between API keys, and this server has none "
                "(server.api_keys, server.admin_api_keys)",
                param="mmrag_shared_with",
            )
        if owner not in self.access.admins:
            raise PermissionDeniedError(
                "mmrag_shared_with: only an admin key (server.admin_api_keys) may share a store",
                param="mmrag_shared_with",
                code="admin_only",
            )

    def _file_row(self, store_id: str, file_id: str) -> dict[str, Any]:
        row = self.records.one(
            "SELECT * FROM files WHERE vector_store_id = ? AND file_id = ? AND removed = 0", store_id, file_id
        )
        if row is None:
            raise NotFoundError(
                f"No file {clip(file_id)} in vector store {clip(store_id)}", param="file_id", code="file_not_found"
            )
        return row

    def _batch_row(self, store_id: str, batch_id: str) -> dict[str, Any]:
        row = self.records.one("SELECT * FROM batches WHERE id = ? AND vector_store_id = ?", batch_id, store_id)
        if row is None:
            raise NotFoundError(
                f"No file batch {clip(batch_id)} in vector store {clip(store_id)}", param="batch_id", code="not_found"
            )
        return row

    def _counts(self, where: str, *args: Any) -> dict[str, int]:
        rows = self.records.all(
            f"SELECT status, COUNT(*) AS n FROM files WHERE removed = 0 AND {where} GROUP BY status", *args
        )
        counts = {"in_progress": 0, "completed": 0, "failed": 0, "cancelled": 0}
        counts |= {r["status"]: r["n"] for r in rows}
        return counts | {"total": sum(counts.values())}

    def _store_object(self, row: dict[str, Any], owner: str | None = None) -> dict[str, Any]:
        counts = self._counts("vector_store_id = ?", row["id"])
        usage = self.records.one(
            "SELECT COALESCE(SUM(usage_bytes), 0) AS n FROM files WHERE vector_store_id = ? AND removed = 0", row["id"]
        )
        expires = row["expires_after"]
        if owner is not None and owner in self.access.admins:  # who owns and shares it: an admin's to manage
            shares = self.records.all("SELECT owner FROM shares WHERE vector_store_id = ? ORDER BY owner", row["id"])
            extension = {"mmrag_owner": row["owner"], "mmrag_shared_with": [s["owner"] for s in shares]}
        else:
            extension = {}
        return {
            "id": row["id"],
            "object": "vector_store",
            "created_at": row["created_at"],
            "last_active_at": row["last_active_at"],
            "name": row["name"] or "",
            "description": row["description"],
            "metadata": row["metadata"],
            "status": "in_progress" if counts["in_progress"] else "completed",
            "usage_bytes": usage["n"] if usage else 0,
            "file_counts": counts,
            "expires_after": expires,
            "expires_at": row["last_active_at"] + 86400 * expires["days"] if expires else None,
            **extension,
        }

    def _page(
        self, table: str, where: str, args: tuple[Any, ...], query: p.ListQuery, id_column: str = "id"
    ) -> tuple[list[dict[str, Any]], bool]:
        """One page of a cursor listing, by creation order (``seq``), from past ``after`` or before ``before``."""
        descending = query.order == "desc"
        clauses, params = [where], list(args)
        for cursor, later in ((query.after, not descending), (query.before, descending)):
            if cursor is None:
                continue
            anchor = self.records.one(f"SELECT seq FROM {table} WHERE {where} AND {id_column} = ?", *args, cursor)
            if anchor is None:
                param = "after" if cursor == query.after else "before"
                raise InvalidRequestError(f"{param}: {clip(cursor)} is not in this listing", param=param)
            clauses.append("seq > ?" if later else "seq < ?")
            params.append(anchor["seq"])
        # `before` pages the other way, then reads back in the asked order.
        reverse = query.before is not None and query.after is None
        direction = "DESC" if descending != reverse else "ASC"
        rows = self.records.all(
            f"SELECT * FROM {table} WHERE {' AND '.join(clauses)} ORDER BY seq {direction} LIMIT ?",
            *params,
            query.limit + 1,
        )
        page = rows[: query.limit]
        return (page[::-1] if reverse else page), len(rows) > query.limit

    def _store(self) -> MilvusStore:
        return self._milvus(self.core.store)

    def _ensure_collection(self) -> None:
        if self._collection_ready:
            return
        store = self._store()

        def create() -> None:
            if store.has_collection(self.collection):
                store.check_encoder(self.collection, self.core.encoder)
            else:
                store.create_collection(
                    self.collection, self.core.encoder, vector_store_partitions=self.config.num_partitions
                )

        self._milvus(create)
        self._collection_ready = True

    def _milvus(self, call, param: str | None = None):
        """Run a Milvus call; its typed errors become the client's (503 for faults, 400 for a filter)."""
        try:
            return call()
        except InvalidFilterError as exc:
            raise InvalidRequestError(exc.message, param=param or "filters", code="invalid_filter") from exc
        except RetrievalError as exc:
            if exc.status_code < 500:
                raise InvalidRequestError(exc.public_message, param=param) from exc
            logger.warning("vector store operation failed: %s", exc.message)
            raise ServiceUnavailableError(f"vector stores unavailable: {exc.public_message}") from exc


def _file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["file_id"],
        "object": "vector_store.file",
        "created_at": row["created_at"],
        "vector_store_id": row["vector_store_id"],
        "status": row["status"],
        "last_error": row["last_error"] if row["status"] == "failed" else None,
        "usage_bytes": row["usage_bytes"],
        "attributes": row["attributes"],
        "chunking_strategy": row["chunking"],
    }


def image_description(filename: str, attributes: dict[str, Any], text: str = "", seen: str = "") -> str:
    """The text an image file is found by: the words of its name (``red-square.png``: "red square"), what the
    served model said it shows (``seen``, asked at ingestion: ``describe.py``), the text it came with when it
    is not just that name (alt or nearby text), and its attachment's attribute values (a client's
    ``description``)."""
    words = " ".join(_NAME_WORDS.split(_CAMEL.sub(" ", Path(filename).stem))).strip()
    lines = [f"Image: {words} ({filename})" if words else f"Image: {filename}"]
    if seen.strip():
        lines.append(f"Model description: {seen.strip()}")
    if text.strip() and text.strip() != filename:
        lines.append(text.strip())
    lines += [
        f"{key}: {value}"
        for key, value in attributes.items()
        if isinstance(value, str | int | float) and not isinstance(value, bool) and str(value).strip()
    ]
    return "\n".join(lines)


_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_NAME_WORDS = re.compile(r"[\W_]+")


def _image_row(
    store_id: str,
    file_id: str,
    index: int,
    filename: str,
    text: str,
    attributes: dict[str, Any],
    seen: str | None = None,
) -> dict[str, Any]:
    """An image file's one chunk: ``kind: "image"`` tells a chat request to load the file and show it as an image
    (``image_text``, ``model_description``: the text it came with and what the model said it shows, kept so
    that new attributes rewrite the description without asking the model again)."""
    text = "" if text.strip() == filename else text.strip()
    description = image_description(filename, attributes, text, seen or "")
    return {
        "id": _chunk_id(store_id, file_id, index),
        "vector_store_id": store_id,
        "file_id": file_id,
        "text": _text_field(description),
        "source": filename,
        "metadata": {
            "kind": "image",
            "file_id": file_id,
            "filename": filename,
            "chunk_index": index,
            "attributes": attributes,
            **({"image_text": text} if text else {}),
            **({"model_description": seen} if seen else {}),
        },
    }


def _text_field(text: str) -> str:
    """Within Milvus's 65,535-byte text field (as chunk_text cuts text chunks): attribute values are short, but
    sixteen of them are not bounded together."""
    return text.encode()[:60000].decode(errors="ignore")


def _file_expr(store_id: str, file_id: str) -> str:
    return f"vector_store_id == {quote_string(store_id)} and file_id == {quote_string(file_id)}"


def _chunk_id(store_id: str, file_id: str, index: int) -> str:
    return hashlib.sha256(f"{store_id}\0{file_id}\0{index}".encode()).hexdigest()[:32]
