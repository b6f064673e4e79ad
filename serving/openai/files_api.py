"""OpenAI's Files API: ``POST /v1/files`` (multipart ``file`` + ``purpose``), list, retrieve, content, delete.

Uploads are parsed from the body as it streams in (python-multipart's push parser) and written straight
into the store's staging folder, so the size limit (``files.max_file_bytes``) stops a large upload at the
byte that crosses it: no upload is ever held in memory or spooled whole to a temporary file first. Every
disk step runs in a bounded worker pool, never on the event loop.

With API keys configured, each file belongs to the key that uploaded it: another key sees a 404. Without
keys the server is open and every client sees every file.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from mmrag.serving.config import MmragConfig
from mmrag.serving.errors import InvalidRequestError, OpenAIError, PayloadTooLargeError, clip
from mmrag.serving.files.store import PURPOSES, FileObject, FileStore, Upload, not_found
from mmrag.serving.offload import Offload

# Room for the multipart framing and the small fields beside the file, over files.max_file_bytes.
_FORM_OVERHEAD = 64 * 1024
_MAX_FIELD_BYTES = 1024
_MAX_PARTS = 8
_EXPIRY_S = (3600, 30 * 24 * 3600)  # OpenAI's bounds on expires_after[seconds]
_READ_CHUNK = 1 << 20


class _UploadTimeoutError(OpenAIError):
    status_code = 408
    error_type = "invalid_request_error"


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class _OpenAIErrorsRoute(APIRoute):
    """Query and path validation errors as OpenAI's 400 naming the parameter (FastAPI's own are 422s in
    another shape)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                first = exc.errors()[0]
                param = str(first["loc"][-1]) if first.get("loc") else None
                raise InvalidRequestError(f"{param}: {first['msg']}", param=param) from None

        return route


_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "purpose": {"type": "string", "enum": list(PURPOSES)},
                    "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                    "expires_after[seconds]": {"type": "integer", "minimum": _EXPIRY_S[0], "maximum": _EXPIRY_S[1]},
                },
            }
        }
    },
}


def files_router(config: MmragConfig) -> APIRouter:
    """The ``/v1/files`` routes over a :class:`FileStore` in ``config.files.directory``."""
    store = FileStore(config.files)
    offload = Offload(config.limits.worker_threads)
    keyed = bool(config.server.accepted_api_keys())
    router = APIRouter(prefix="/v1/files", tags=["files"], route_class=_OpenAIErrorsRoute)

    def owner_of(request: Request) -> str | None:
        return key_owner(request) if keyed else None

    @router.post("", response_model=FileObject, openapi_extra={"requestBody": _UPLOAD_BODY})
    async def create_file(request: Request) -> FileObject:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.files.max_file_bytes + _FORM_OVERHEAD:
            raise _too_large(config.files.max_file_bytes)
        boundary = _boundary(request.headers.get("content-type", ""))
        form = _UploadForm(boundary, await offload.run(store.begin))
        chunks = aiter(request.stream())
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(chunks), config.files.upload_idle_timeout_s)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise _UploadTimeoutError(
                        f"no upload data for {config.files.upload_idle_timeout_s:g} s (files.upload_idle_timeout_s)",
                        param="file",
                    ) from None
                await offload.run(form.feed, chunk)
            return await offload.run(form.commit, owner_of(request))
        except ClientDisconnect:  # the client hung up mid-upload: nothing is kept, no one to answer
            return Response(status_code=499)
        finally:
            await offload.run(form.upload.abort)  # a no-op once committed

    @router.get("", response_model=FileList)
    async def list_files(
        request: Request,
        purpose: str | None = Query(None, description="Only files with this purpose."),
        limit: int = Query(10_000, ge=1, le=10_000, description="Files per page."),
        order: Literal["asc", "desc"] = Query("desc", description="By created_at."),
        after: str | None = Query(None, description="A file id: the page starts after it."),
    ) -> FileList:
        files, more = await offload.run(
            store.list, purpose=purpose, limit=limit, order=order, after=after, owner=owner_of(request)
        )
        ids = [f.id for f in files]
        return FileList(data=files, first_id=ids[0] if ids else None, last_id=ids[-1] if ids else None, has_more=more)

    @router.get("/{file_id}", response_model=FileObject)
    async def retrieve_file(request: Request, file_id: str) -> FileObject:
        return await offload.run(store.get, file_id, owner=owner_of(request))

    @router.delete("/{file_id}", response_model=FileDeleted)
    async def delete_file(request: Request, file_id: str) -> FileDeleted:
        if not await offload.run(store.delete, file_id, owner=owner_of(request)):
            raise not_found(file_id)
        return FileDeleted(id=file_id, deleted=True)

    @router.get("/{file_id}/content", response_class=StreamingResponse)
    async def file_content(request: Request, file_id: str) -> Response:
        # Opened before the response starts: a delete meanwhile cannot cut the download short.
        file, handle = await offload.run(store.open, file_id, owner=owner_of(request))

        async def body() -> AsyncIterator[bytes]:
            try:
                while chunk := await offload.run(handle.read, _READ_CHUNK):
                    yield chunk
            finally:
                await offload.run(handle.close)

        headers = {
            "content-length": str(file.bytes),
            "content-disposition": f"attachment; filename*=utf-8''{quote(file.filename)}",
        }
        return StreamingResponse(body(), media_type="application/octet-stream", headers=headers)

    return router


def key_owner(request: Request) -> str:
    """The owner id of a request's API key: a digest of the bearer token (the key itself is never stored).
    The edge middleware has already accepted the key; like it, the last Authorization header counts."""
    values = request.headers.getlist("authorization")
    token = values[-1].partition(" ")[2] if values else ""
    return "key-" + hashlib.sha256(token.encode()).hexdigest()[:32]


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"file larger than the {limit} bytes this server accepts (files.max_file_bytes)",
        param="file",
        code="file_too_large",
    )


def _boundary(content_type: str) -> bytes:
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidRequestError(
            "send the upload as multipart/form-data with the fields `file` and `purpose`", param="file"
        )
    return boundary


class _UploadForm:
    """A multipart body pushed through python-multipart chunk by chunk: the ``file`` part goes to an
    :class:`Upload` as it arrives, the other (small) fields are collected. Runs in worker threads."""

    def __init__(self, boundary: bytes, upload: Upload):
        self.upload = upload
        self.fields: dict[str, bytearray] = {}
        self.filename: bytes | None = None
        self._parts = 0
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._target: bytearray | None = None  # the field being read; None while in the file part
        self._in_file = False
        self._name = ""
        self._finished = False
        callbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_end": self._end,
        }
        self._parser = MultipartParser(boundary, callbacks)

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError:
            raise InvalidRequestError("malformed multipart/form-data body", param="file") from None

    def commit(self, owner: str | None) -> FileObject:
        if not self._finished:
            raise InvalidRequestError("the multipart/form-data body ended early", param="file")
        if self.filename is None:
            raise InvalidRequestError("missing required field `file` (a file part)", param="file")
        purpose = self._field("purpose")
        if purpose is None:
            raise InvalidRequestError("missing required field `purpose`", param="purpose")
        return self.upload.commit(self.filename, purpose, owner=owner, expires_at=self._expires_at())

    def _expires_at(self) -> int | None:
        anchor, seconds = self._field("expires_after[anchor]"), self._field("expires_after[seconds]")
        if anchor is None and seconds is None:
            return None
        if anchor != "created_at":
            raise InvalidRequestError("expires_after[anchor] must be 'created_at'", param="expires_after.anchor")
        low, high = _EXPIRY_S
        if seconds is None or not seconds.isdigit() or not low <= int(seconds) <= high:
            raise InvalidRequestError(
                f"expires_after[seconds] must be an integer from {low} to {high}", param="expires_after.seconds"
            )
        return int(time.time()) + int(seconds)

    def _field(self, name: str) -> str | None:
        raw = self.fields.get(name)
        if raw is None:
            return None
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise InvalidRequestError(f"field `{name}` is not UTF-8", param=name) from None

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > _MAX_PARTS:
            raise InvalidRequestError(f"more than {_MAX_PARTS} parts in the form", param="file")
        self._disposition = b""

    def _header_end(self) -> None:
        if self._header_field.lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", errors="replace")
        if name == "file":
            if self.filename is not None:
                raise InvalidRequestError("send one `file` per upload", param="file")
            self.filename = options.get(b"filename") or b"upload"
            self._in_file, self._target = True, None
            return
        if name not in ("purpose", "expires_after[anchor]", "expires_after[seconds]"):
            raise InvalidRequestError(f"unknown field {clip(name, 40)}", param=name[:40] or None)
        if name in self.fields:
            raise InvalidRequestError(f"field `{name}` given twice", param=name)
        self._in_file, self._target, self._name = False, self.fields.setdefault(name, bytearray()), name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.upload.write(data[start:end])  # raises the 413 past files.max_file_bytes
        elif self._target is not None:
            self._target.extend(data[start:end])
            if len(self._target) > _MAX_FIELD_BYTES:
                raise InvalidRequestError(
                    f"field `{self._name}` is longer than {_MAX_FIELD_BYTES} bytes", param=self._name
                )

    def _end(self) -> None:
        self._finished = True
