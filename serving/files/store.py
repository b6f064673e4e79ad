"""Uploaded files on disk: one folder per file, published by one atomic rename.

Layout under ``files.directory``::

    file-<24 hex>/content     the bytes as uploaded
    file-<24 hex>/file.json   the metadata sidecar (the FileObject, owner, sha256)
    .staging/<random>/        uploads being written
    .trash/<random>/          deleted files being removed

Why a sidecar JSON per file rather than one sqlite3 database: each file is then self-contained, so several
replicas (or processes, like the CLI and the server) can create and delete files in one shared directory
with no lock to hold and nothing to corrupt if one of them dies mid-write; a folder is either published
whole or not at all. A database would make listing faster (a list here reads one small JSON per file: about
80 ms for 2,000 files on this project's CI machines, linear beyond), but sqlite's locking is unsafe on the
network volumes that replicas share. Creating a file costs two fsyncs (about 7 ms).

Atomicity: an upload streams into ``.staging/<random>/content``; at the end the sidecar is written beside
it, both are fsynced, and the folder is renamed to ``file-<id>`` (same filesystem, so ``rename`` is atomic):
a crash leaves at most an orphan in ``.staging``, never a file without its metadata or with half its bytes.
Deletion renames the folder into ``.trash`` (it vanishes at once) and removes it there. Orphans older than
an hour are swept when a store opens (younger ones may be another replica's upload in flight).

The file name from the client is metadata only: bytes are always stored as ``content`` under an id the
server made, so no client string ever becomes part of a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal

from pydantic import BaseModel

from mmrag.serving.errors import InvalidRequestError, NotFoundError, PayloadTooLargeError, clip
from mmrag.serving.files.config import FilesConfig

# OpenAI's upload purposes (openai.types.FilePurpose); the server keeps every one alike.
PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
FileStatus = Literal["uploaded", "processed", "error"]

_ID = re.compile(r"file-[0-9a-f]{24}")
_CONTENT = "content"
_META = "file.json"
_ORPHAN_AGE_S = 3600.0
_MAX_FILENAME_BYTES = 255
_COPY_CHUNK = 1 << 20


class FileObject(BaseModel):
    """OpenAI's ``File`` object (openai.types.FileObject)."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: FileStatus = "processed"
    expires_at: int | None = None
    status_details: str | None = None


def not_found(file_id: str) -> NotFoundError:
    return NotFoundError(f"No such File object: {clip(file_id)}", param="file_id", code="file_not_found")


def safe_filename(name: str | bytes | None) -> str:
    """The last component of a client's file name, printable, at most 255 UTF-8 bytes (extension kept);
    'upload' when nothing is left. Never used as a path: it is what listings and downloads show."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", errors="replace")
    name = unicodedata.normalize("NFC", name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    if name in ("", ".", ".."):
        return "upload"
    if len(name.encode()) > _MAX_FILENAME_BYTES:
        stem, dot, ext = name.rpartition(".")
        ext = ext if dot and stem and len(ext.encode()) <= 16 else ""
        keep = _MAX_FILENAME_BYTES - len(ext.encode()) - (1 if ext else 0)
        stem = (stem if ext else name).encode()[:keep].decode("utf-8", errors="ignore")
        name = f"{stem}.{ext}" if ext else stem
    return name


def check_purpose(purpose: str) -> str:
    if purpose not in PURPOSES:
        raise InvalidRequestError(
            f"purpose {clip(purpose)} is not one of {', '.join(PURPOSES)}", param="purpose", code="invalid_value"
        )
    return purpose


class Upload:
    """One file being written into staging: ``write`` chunks (the size limit is checked on each), then
    ``commit`` publishes it; ``abort`` (or leaving a ``with`` block uncommitted) removes it."""

    def __init__(self, store: FileStore):
        self._store = store
        self._staged = Path(tempfile.mkdtemp(prefix="upload-", dir=store.directory / ".staging"))
        self._out: IO[bytes] | None = (self._staged / _CONTENT).open("wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        if self._out is None:
            raise RuntimeError("upload already committed or aborted")
        self.size += len(chunk)
        if self.size > self._store.max_file_bytes:
            self.abort()
            raise PayloadTooLargeError(
                f"file larger than the {self._store.max_file_bytes} bytes this server accepts (files.max_file_bytes)",
                param="file",
                code="file_too_large",
            )
        self._out.write(chunk)
        self._hash.update(chunk)

    def commit(
        self, filename: str | bytes | None, purpose: str, *, owner: str | None = None, expires_at: int | None = None
    ) -> FileObject:
        if self._out is None:
            raise RuntimeError("upload already committed or aborted")
        try:
            check_purpose(purpose)
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
            self._out = None
            file = FileObject(
                id=f"file-{secrets.token_hex(12)}",
                bytes=self.size,
                created_at=int(time.time()),
                filename=safe_filename(filename),
                purpose=purpose,
                expires_at=expires_at,
            )
            record = {
                "file": file.model_dump(),
                "owner": owner,
                "sha256": self._hash.hexdigest(),
                "created_ns": time.time_ns(),
            }
            _write_synced(self._staged / _META, json.dumps(record).encode())
            _fsync_dir(self._staged)
            os.rename(self._staged, self._store.directory / file.id)
            _fsync_dir(self._store.directory)
        except BaseException:
            self.abort()
            raise
        return file

    def abort(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        shutil.rmtree(self._staged, ignore_errors=True)

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._out is not None:
            self.abort()


class FileStore:
    """Files in ``config.resolved_directory()``. Every method blocks on disk: call it off the event loop.

    ``owner`` (an opaque key id) scopes every lookup when given: a file created with another owner is
    reported as missing. ``None`` means no scoping (servers without API keys, and internal callers)."""

    def __init__(self, config: FilesConfig):
        self.directory = config.resolved_directory()
        self.max_file_bytes = config.max_file_bytes
        for folder in (self.directory, self.directory / ".staging", self.directory / ".trash"):
            folder.mkdir(parents=True, exist_ok=True)
        self._sweep_orphans()

    def begin(self) -> Upload:
        """A streaming upload (the HTTP route feeds it chunk by chunk)."""
        return Upload(self)

    def create(
        self,
        filename: str,
        purpose: str,
        data: bytes | BinaryIO | Iterable[bytes],
        *,
        owner: str | None = None,
        expires_at: int | None = None,
    ) -> FileObject:
        """Store ``data`` (bytes, a binary file object, or an iterable of chunks) as a new file."""
        check_purpose(purpose)
        with self.begin() as upload:
            if isinstance(data, bytes | bytearray | memoryview):
                upload.write(bytes(data))
            elif hasattr(data, "read"):
                while chunk := data.read(_COPY_CHUNK):  # type: ignore[union-attr]
                    upload.write(chunk)
            else:
                for chunk in data:  # type: ignore[union-attr]
                    upload.write(chunk)
            return upload.commit(filename, purpose, owner=owner, expires_at=expires_at)

    def get(self, file_id: str, *, owner: str | None = None) -> FileObject:
        return FileObject.model_validate(self._record(file_id, owner)["file"])

    def sha256(self, file_id: str, *, owner: str | None = None) -> str:
        """The hex SHA-256 of the content (computed at upload): lets callers skip re-indexing equal bytes."""
        return self._record(file_id, owner)["sha256"]

    def path(self, file_id: str, *, owner: str | None = None) -> Path:
        """The content on disk. It may vanish if the file is deleted meanwhile: prefer :meth:`open`."""
        self._record(file_id, owner)
        return self.directory / file_id / _CONTENT

    def open(self, file_id: str, *, owner: str | None = None) -> tuple[FileObject, BinaryIO]:
        """The file's object and its content opened for reading (it stays readable after a delete)."""
        file = self.get(file_id, owner=owner)
        try:
            return file, (self.directory / file_id / _CONTENT).open("rb")
        except FileNotFoundError:
            raise not_found(file_id) from None

    def read(self, file_id: str, *, owner: str | None = None) -> bytes:
        _, handle = self.open(file_id, owner=owner)
        with handle:
            return handle.read()

    def list(
        self,
        *,
        purpose: str | None = None,
        limit: int = 10_000,
        order: Literal["asc", "desc"] = "desc",
        after: str | None = None,
        owner: str | None = None,
    ) -> tuple[list[FileObject], bool]:
        """Files by creation time (``order``), from just past ``after``; returns (page, has_more)."""
        records = []
        for entry in os.scandir(self.directory):
            if _ID.fullmatch(entry.name):
                record = self._load(entry.name)
                if record is not None and self._visible(record, owner):
                    records.append(record)
        records.sort(key=lambda r: (r["created_ns"], r["file"]["id"]), reverse=order == "desc")
        if after is not None:
            ids = [r["file"]["id"] for r in records]
            if after not in ids:
                raise InvalidRequestError(f"after: no file {clip(after)} in this listing", param="after")
            records = records[ids.index(after) + 1 :]
        if purpose is not None:
            records = [r for r in records if r["file"]["purpose"] == purpose]
        page = records[:limit]
        return [FileObject.model_validate(r["file"]) for r in page], len(records) > limit

    def delete(self, file_id: str, *, owner: str | None = None) -> bool:
        """Remove a file; False when there was none (or it is another owner's)."""
        if not _ID.fullmatch(file_id):
            return False
        record = self._load(file_id)
        if record is None or not _owned(record, owner):
            return False
        trash = Path(tempfile.mkdtemp(prefix=f"{file_id}-", dir=self.directory / ".trash"))
        try:
            os.rename(self.directory / file_id, trash / "file")
        except FileNotFoundError:  # deleted meanwhile by another caller
            shutil.rmtree(trash, ignore_errors=True)
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _record(self, file_id: str, owner: str | None) -> dict[str, Any]:
        record = self._load(file_id) if _ID.fullmatch(file_id) else None
        if record is None or not _owned(record, owner):
            raise not_found(file_id)
        if _expired(record):
            self.delete(file_id)
            raise not_found(file_id)
        return record

    def _visible(self, record: dict[str, Any], owner: str | None) -> bool:
        if _expired(record):
            self.delete(record["file"]["id"])
            return False
        return _owned(record, owner)

    def _load(self, file_id: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.directory / file_id / _META).read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _sweep_orphans(self) -> None:
        cutoff = time.time() - _ORPHAN_AGE_S
        for folder in (self.directory / ".staging", self.directory / ".trash"):
            for entry in os.scandir(folder):
                try:
                    # The newest write inside counts: a slow upload keeps touching its `content`.
                    touched = [entry.stat(follow_symlinks=False).st_mtime]
                    touched += [inner.stat(follow_symlinks=False).st_mtime for inner in os.scandir(entry.path)]
                except (FileNotFoundError, NotADirectoryError):
                    continue
                if max(touched) < cutoff:
                    shutil.rmtree(entry.path, ignore_errors=True)


def _owned(record: dict[str, Any], owner: str | None) -> bool:
    return owner is None or record.get("owner") == owner


def _expired(record: dict[str, Any]) -> bool:
    expires_at = record["file"].get("expires_at")
    return expires_at is not None and expires_at <= time.time()


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
