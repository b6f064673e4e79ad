"""``/v1/vector_stores``: OpenAI's Vector Stores API over a :class:`VectorStoreBackend`.

HTTP only: bodies and query strings are validated here (a 400 naming the field), the work is done by the
service where the Milvus connection lives (``serving/vector_stores/service.py``), reached through the
backend. An in-progress file or batch carries ``openai-poll-after-ms``, the SDK's ``*_and_poll`` interval.

With API keys configured every call carries the request's owner (its key id, never the key) to the service,
which answers only with that key's stores (``serving/vector_stores/access.py``); without keys, ``None``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from mmrag.serving.config import MmragConfig
from mmrag.serving.errors import InvalidRequestError, OpenAIError, PayloadTooLargeError
from mmrag.serving.openai.files_api import key_owner
from mmrag.serving.openai.protocol import json_object, validated
from mmrag.serving.vector_stores import protocol as p
from mmrag.serving.vector_stores.access import key_id
from mmrag.serving.vector_stores.backend import LocalVectorStoreBackend, Method, VectorStoreBackend, backend_of

logger = logging.getLogger(__name__)

# Vector-store bodies are small (a batch of 2000 file ids is ~70 KB).
MAX_BODY_BYTES = 1 << 20
Model = TypeVar("Model", bound=BaseModel)


def vector_stores_router(
    config: MmragConfig, backend: VectorStoreBackend | None = None, chat_backend: Any = None
) -> APIRouter:
    """The routes; ``backend`` None: the one ``chat_backend`` offers (see ``backend_of``), else none (404s)."""
    backend = backend or backend_of(chat_backend) or LocalVectorStoreBackend(None)
    poll_ms = str(config.vector_stores.poll_after_ms)
    router = APIRouter(prefix="/v1/vector_stores", tags=["vector_stores"])
    owner_of = request_owners(config)
    key_ids = {key_id(key) for key in config.server.accepted_api_keys()}

    async def call(method: Method, request: Request, **kwargs: Any) -> Any:
        try:
            return await backend.call(method, owner=owner_of(request), **kwargs)
        except OpenAIError:
            raise
        except Exception as exc:
            logger.exception("vector store %s failed", method)
            raise OpenAIError("internal server error") from exc

    def polled(obj: dict[str, Any]) -> JSONResponse:
        headers = {"openai-poll-after-ms": poll_ms} if obj.get("status") == "in_progress" else None
        return JSONResponse(obj, headers=headers)

    @router.post("", openapi_extra=documented(p.CreateStore))
    async def create_store(request: Request) -> JSONResponse:
        return JSONResponse(await call("create_store", request, body=await parse(request, p.CreateStore)))

    @router.get("")
    async def list_stores(request: Request) -> JSONResponse:
        return JSONResponse(await call("list_stores", request, query=list_query(request, statuses=False)))

    @router.get("/{store_id}")
    async def get_store(store_id: str, request: Request) -> JSONResponse:
        return JSONResponse(await call("get_store", request, store_id=store_id))

    @router.post("/{store_id}", openapi_extra=documented(p.UpdateStore))
    async def update_store(store_id: str, request: Request) -> JSONResponse:
        body = await parse(request, p.UpdateStore)
        for i, shared in enumerate(body.mmrag_shared_with or []):
            if shared not in key_ids:  # a typo would share with nobody, silently
                raise InvalidRequestError(
                    f"mmrag_shared_with[{i}]: not the key id of an API key of this server",
                    param=f"mmrag_shared_with[{i}]",
                )
        return JSONResponse(await call("update_store", request, store_id=store_id, body=body))

    @router.delete("/{store_id}")
    async def delete_store(store_id: str, request: Request) -> JSONResponse:
        return JSONResponse(await call("delete_store", request, store_id=store_id))

    @router.post("/{store_id}/files", openapi_extra=documented(p.AttachFile))
    async def attach_file(store_id: str, request: Request) -> JSONResponse:
        body = await parse(request, p.AttachFile)
        return polled(await call("attach_file", request, store_id=store_id, body=body))

    @router.get("/{store_id}/files")
    async def list_files(store_id: str, request: Request) -> JSONResponse:
        return JSONResponse(await call("list_files", request, store_id=store_id, query=list_query(request)))

    @router.get("/{store_id}/files/{file_id}")
    async def get_file(store_id: str, file_id: str, request: Request) -> JSONResponse:
        return polled(await call("get_file", request, store_id=store_id, file_id=file_id))

    @router.get("/{store_id}/files/{file_id}/content")
    async def file_content(store_id: str, file_id: str, request: Request) -> JSONResponse:
        return JSONResponse(await call("file_content", request, store_id=store_id, file_id=file_id))

    @router.post("/{store_id}/files/{file_id}", openapi_extra=documented(p.UpdateFile))
    async def update_file(store_id: str, file_id: str, request: Request) -> JSONResponse:
        body = await parse(request, p.UpdateFile)
        return JSONResponse(await call("update_file", request, store_id=store_id, file_id=file_id, body=body))

    @router.delete("/{store_id}/files/{file_id}")
    async def delete_file(store_id: str, file_id: str, request: Request) -> JSONResponse:
        return JSONResponse(await call("delete_file", request, store_id=store_id, file_id=file_id))

    @router.post("/{store_id}/file_batches", openapi_extra=documented(p.CreateBatch))
    async def create_batch(store_id: str, request: Request) -> JSONResponse:
        body = await parse(request, p.CreateBatch)
        return polled(await call("create_batch", request, store_id=store_id, body=body))

    @router.get("/{store_id}/file_batches/{batch_id}")
    async def get_batch(store_id: str, batch_id: str, request: Request) -> JSONResponse:
        return polled(await call("get_batch", request, store_id=store_id, batch_id=batch_id))

    @router.get("/{store_id}/file_batches/{batch_id}/files")
    async def list_batch_files(store_id: str, batch_id: str, request: Request) -> JSONResponse:
        query = list_query(request)
        return JSONResponse(await call("list_files", request, store_id=store_id, query=query, batch_id=batch_id))

    @router.post("/{store_id}/search", openapi_extra=documented(p.Search))
    async def search(store_id: str, request: Request) -> JSONResponse:
        body = await parse(request, p.Search)
        return JSONResponse(await call("search", request, store_id=store_id, body=body))

    return router


def request_owners(config: MmragConfig) -> Callable[[Request], str | None]:
    """A request's owner: its key's id on a server with API keys (as the Files API scopes files), else None."""
    if not config.server.accepted_api_keys():
        return lambda _request: None
    return key_owner


async def parse(request: Request, model: type[Model]) -> Model:
    """A JSON body validated as ``model``; every refusal a 400 naming the field (413 past the size bound)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise PayloadTooLargeError(f"request body larger than {MAX_BODY_BYTES} bytes")
    payload = json_object(body or b"{}")
    if b"\\u" in body:  # only an escape can carry a lone surrogate, which the encoder and SQLite cannot take
        try:
            json.dumps(payload, ensure_ascii=False).encode()
        except UnicodeEncodeError as exc:
            raise InvalidRequestError("the request body holds a lone surrogate (not valid Unicode)") from exc
    return validated(model, payload)


def documented(model: type[BaseModel]) -> dict[str, Any]:
    """The route's JSON body in the OpenAPI document (the route parses it itself, to answer in OpenAI's shape),
    its ``$defs`` inlined so the schema stands alone."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(value) for value in node] if isinstance(node, list) else node

    body = {"required": True, "content": {"application/json": {"schema": inline(schema)}}}
    return {"requestBody": body}


def list_query(request: Request, statuses: bool = True) -> p.ListQuery:
    params = dict(request.query_params)
    if not statuses and "filter" in params:
        raise InvalidRequestError("filter: not a parameter of this listing", param="filter")
    return validated(p.ListQuery, params)
