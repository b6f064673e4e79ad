"""``mmrag ingest --server URL``: local files into a running server's vector store, over its HTTP API.

This is the way to a running server's own vector stores from another machine, or from any client: it needs
nothing but the URL (plain ``mmrag ingest`` beside a local server reaches the same Milvus Lite data through
that server's Lite server, but into a CLI collection, not a vector store).

Each file is uploaded (``POST /v1/files``, streamed from disk) and attached to a vector store
(``POST /v1/vector_stores/{id}/files``) with two attributes: ``path``
(relative to the working directory, as the Lite path's ``source``) and ``sha256``. Those make it
idempotent: a file whose path and bytes are already in the store is skipped, a changed one is added beside
the old version, or replaces it with ``replace``; a file that failed before is retried. Then every
attachment is polled until it is ``completed`` or ``failed`` (with the server's reason).

Only OpenAI's Files and Vector Stores shapes are used, so any server speaking them works; httpx is the
client (the ``openai`` package is a test dependency only).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

# What the server's parsers read (serving/files/parsers.py); images are indexed as the vector store decides.
SERVER_SUFFIXES = (".txt", ".md", ".markdown", ".jsonl", ".pdf", ".html", ".htm", ".png", ".jpg", ".jpeg", ".webp")
_MAX_ATTRIBUTE_CHARS = 512  # OpenAI's bound on an attribute's string value
_PAGE = 100


class RemoteError(Exception):
    """The server refused a call, or could not be reached; the message says which call and why."""


@dataclass
class RemoteSummary:
    vector_store_id: str
    files: int = 0
    uploaded: int = 0
    skipped: int = 0
    replaced: int = 0
    completed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0

    def describe(self) -> str:
        return (
            f"{self.vector_store_id}: {self.files} files, {self.uploaded} uploaded ({self.skipped} already stored"
            + (f", {self.replaced} replaced" if self.replaced else "")
            + f"), {self.completed} indexed, {len(self.failed)} failed in {self.seconds:.1f} s"
        )


class ServerClient:
    """The few Files and Vector Stores calls ingestion makes, each raising :class:`RemoteError`."""

    def __init__(self, http: httpx.Client):
        self.http = http

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise RemoteError(f"{method} {path}: cannot reach the server ({type(exc).__name__}: {exc})") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise RemoteError(f"{method} {path}: {response.status_code} {message}")
        return response

    def pages(self, path: str) -> Iterable[dict[str, Any]]:
        """Every object of a cursor-paginated list."""
        params: dict[str, Any] = {"limit": _PAGE, "order": "asc"}
        while True:
            body = self.call("GET", path, params=params).json()
            yield from body["data"]
            if not body.get("has_more") or not body["data"]:
                return
            params["after"] = body["data"][-1]["id"]

    def resolve_store(self, name_or_id: str) -> str:
        """A store id: ``vs_...`` as given (it must exist), else the store with that name, created if none."""
        if name_or_id.startswith("vs_"):
            return self.call("GET", f"/v1/vector_stores/{name_or_id}").json()["id"]
        for store in self.pages("/v1/vector_stores"):
            if store.get("name") == name_or_id:
                return store["id"]
        return self.call("POST", "/v1/vector_stores", json={"name": name_or_id}).json()["id"]


def ingest_through_server(
    http: httpx.Client,
    files: list[Path],
    vector_store: str,
    *,
    source_of: Callable[[Path], str],
    replace: bool = False,
    chunking: dict[str, int] | None = None,
    timeout_s: float = 600.0,
    progress: Callable[[str], None] | None = None,
) -> RemoteSummary:
    """Upload and attach ``files`` to ``vector_store`` (a name or ``vs_`` id) and wait for their indexing.
    ``chunking``: OpenAI's static strategy (``max_chunk_size_tokens``, ``chunk_overlap_tokens``)."""
    started = time.perf_counter()
    server = ServerClient(http)
    store_id = server.resolve_store(vector_store)
    summary = RemoteSummary(store_id, files=len(files))
    stored: dict[str, list[dict[str, Any]]] = {}
    for attached in server.pages(f"/v1/vector_stores/{store_id}/files"):
        path = (attached.get("attributes") or {}).get("path")
        if isinstance(path, str):
            stored.setdefault(path, []).append(attached)

    waiting: dict[str, str] = {}  # file id -> path
    for local in files:
        path = source_of(local)[:_MAX_ATTRIBUTE_CHARS]
        digest = _sha256(local)
        versions = stored.get(path, [])
        if any(v["attributes"].get("sha256") == digest and v["status"] != "failed" for v in versions):
            summary.skipped += 1
            continue
        for old in versions:
            if replace or (old["status"] == "failed" and old["attributes"].get("sha256") == digest):
                server.call("DELETE", f"/v1/vector_stores/{store_id}/files/{old['id']}")
                _delete_file(server, old["id"])
                summary.replaced += old["status"] != "failed"
        with local.open("rb") as handle:
            uploaded = server.call(
                "POST", "/v1/files", files={"file": (local.name, handle)}, data={"purpose": "assistants"}
            ).json()
        summary.uploaded += 1
        attach: dict[str, Any] = {"file_id": uploaded["id"], "attributes": {"path": path, "sha256": digest}}
        if chunking:
            attach["chunking_strategy"] = {"type": "static", "static": chunking}
        server.call("POST", f"/v1/vector_stores/{store_id}/files", json=attach)
        waiting[uploaded["id"]] = path
        if progress:
            progress(f"uploaded {path}")

    deadline = time.monotonic() + timeout_s
    while waiting:
        for file_id, path in list(waiting.items()):
            attached = server.call("GET", f"/v1/vector_stores/{store_id}/files/{file_id}").json()
            if attached["status"] == "in_progress":
                continue
            del waiting[file_id]
            if attached["status"] == "completed":
                summary.completed += 1
            else:
                error = attached.get("last_error") or {}
                summary.failed.append((path, f"{attached['status']}: {error.get('message', 'no reason given')}"))
            if progress:
                progress(f"{attached['status']} {path}")
        if waiting:
            if time.monotonic() > deadline:
                raise RemoteError(f"{len(waiting)} files still being indexed after {timeout_s:g} s (--timeout)")
            time.sleep(0.2)
    summary.seconds = time.perf_counter() - started
    return summary


def _delete_file(server: ServerClient, file_id: str) -> None:
    try:
        server.call("DELETE", f"/v1/files/{file_id}")
    except RemoteError as exc:
        if " 404 " not in str(exc):  # already gone is fine
            raise


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
