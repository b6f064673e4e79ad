"""The durable records of vector stores, their files and file batches: one SQLite file, one writer process.

Why SQLite and not a Milvus collection of records: a file's status is a small read-modify-write (attach,
progress, complete, fail, delete racing an ingestion) that SQLite does in a transaction, where Milvus offers
neither transactions nor a schema without a vector; and crash recovery ("every attachment left
``in_progress`` was interrupted") is only correct when one process owns the records, which is what the
process is (the ``VectorStores`` deployment's one replica, or the retriever's when there is one retriever).
The file sits beside the Lite file, so the two move, back up and disappear together. One process writes
(it holds ``<file>.lock``); another that opens the same records, such as a batch job beside the server,
only reads them. Several retriever replicas forward every records call to that one writer
(``deployments/vector_stores.py``).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stores (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL,
    last_active_at INTEGER NOT NULL,
    name TEXT,
    description TEXT,
    metadata TEXT NOT NULL,
    expires_after TEXT,
    removed INTEGER NOT NULL DEFAULT 0,  -- deleted through the API; its chunks may still be in Milvus
    owner TEXT  -- the creating key's id (access.py); NULL: made without API keys
);
CREATE TABLE IF NOT EXISTS shares (  -- the keys an admin shared a store with, read only (access.py)
    vector_store_id TEXT NOT NULL REFERENCES stores(id) ON DELETE CASCADE,
    owner TEXT NOT NULL,
    PRIMARY KEY (vector_store_id, owner)
);
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    vector_store_id TEXT NOT NULL REFERENCES stores(id) ON DELETE CASCADE,
    file_id TEXT NOT NULL,
    filename TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    last_error TEXT,
    attributes TEXT NOT NULL,
    chunking TEXT NOT NULL,
    usage_bytes INTEGER NOT NULL DEFAULT 0,
    batch_id TEXT,
    removed INTEGER NOT NULL DEFAULT 0,  -- deleted through the API; its chunks may still be in Milvus
    cleanup INTEGER NOT NULL DEFAULT 0,  -- failed; its chunks may still be in Milvus
    UNIQUE (vector_store_id, file_id)
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    vector_store_id TEXT NOT NULL REFERENCES stores(id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_batch ON files (batch_id);
CREATE INDEX IF NOT EXISTS shares_by_owner ON shares (owner);
"""
# Columns added since the first release, with their definitions: an older file gains them when opened,
# then the indexes over them.
_ADDED_COLUMNS = {"stores": {"owner": "TEXT"}}
_ADDED_INDEXES = {"stores_by_owner": "CREATE INDEX IF NOT EXISTS stores_by_owner ON stores (owner)"}
_JSON_COLUMNS = ("metadata", "expires_after", "last_error", "attributes", "chunking")


class Records:
    """Thread-safe access to the records (one connection, one lock: writes are small and rare)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._migrate()

        self._owner_fd: int | None = None

    def _migrate(self) -> None:
        """Add what an older records file lacks, in one write transaction, taken only when something is
        missing (a reader opening an up-to-date file writes nothing; of two processes opening an old one, the
        second finds it done)."""

        def missing(db: sqlite3.Connection) -> list[str]:
            statements = []
            for table, columns in _ADDED_COLUMNS.items():
                have = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
                statements += [f"ALTER TABLE {table} ADD COLUMN {c} {d}" for c, d in columns.items() if c not in have]
            indexes = {row["name"] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
            return statements + [sql for name, sql in _ADDED_INDEXES.items() if name not in indexes]

        with self._lock:
            if not missing(self._db):
                return
        with self.transaction() as db:
            for statement in missing(db):
                db.execute(statement)

    def try_own(self) -> bool:
        """Take the records' writer lock (``<file>.lock``, held until :meth:`close` or the process ends): one
        process indexes and recovers; another (a batch job on the same records) only reads."""
        if self._owner_fd is None:
            fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            self._owner_fd = fd
        return True

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._owner_fd is not None:
                os.close(self._owner_fd)  # releases the lock
                self._owner_fd = None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def one(self, sql: str, *args: Any) -> dict[str, Any] | None:
        rows = self.all(sql, *args)
        return rows[0] if rows else None

    def all(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [_decode(row) for row in self._db.execute(sql, args).fetchall()]

    def execute(self, sql: str, *args: Any) -> int:
        """One statement in its own transaction; the number of rows changed."""
        with self.transaction() as db:
            return db.execute(sql, args).rowcount


def encode(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for column in _JSON_COLUMNS:
        if column in out and out[column] is not None:
            out[column] = json.loads(out[column])
    return out


def now() -> int:
    return int(time.time())
