"""The playground page (``server.playground``): three static files, served by the app itself.

The page is a client of the public API and nothing else: it calls ``/v1/*`` from the browser, same
origin, with the key the user types into it sent as a bearer header (never stored by the server, kept in
the page's memory only). Its files are therefore public even when API keys are set (:func:`is_page_path`,
read by :mod:`.edge`): they hold no data, and every call they make is checked like any other client's.

The files are read once, when the app is built, and served from memory with fixed content types; no
path from a request ever reaches the file system. Every response carries a Content-Security-Policy that
allows only the page's own script and style, images from the page, ``data:`` (attached images) and
``blob:`` (retrieved image files fetched with the key), and connections to this origin: model and document
text is put into the page as text, never parsed as markup, and the policy is the second line of that
defence.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

PAGE_PATH = "/playground"
# Name in the package folder -> content type. The page links them relative to /playground, so the app
# also works under a proxy's path prefix.
ASSETS = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Small files, revalidated on each load: an upgraded server never runs a stale script against a new API.
    "Cache-Control": "no-cache",
}


def is_page_path(path: str) -> bool:
    """The paths the playground serves without a key: ``/``, the page and its files."""
    return path in ("/", PAGE_PATH) or path.startswith(PAGE_PATH + "/")


def _read(name: str) -> bytes:
    return resources.files("mmrag.serving.openai").joinpath("playground", name).read_bytes()


def playground_router() -> APIRouter:
    """``GET /`` (a redirect), ``GET /playground`` and ``GET /playground/<asset>``."""
    page = _read("index.html")
    assets = {name: (_read(name), content_type) for name, content_type in ASSETS.items()}
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def root() -> Response:
        # Relative, so that it also works under a proxy's path prefix.
        return RedirectResponse(PAGE_PATH.lstrip("/"), status_code=307, headers=PAGE_HEADERS)

    @router.get(PAGE_PATH)
    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    for name, (body, content_type) in assets.items():
        router.add_api_route(f"{PAGE_PATH}/{name}", _asset(body, content_type), methods=["GET"])
    return router


def _asset(body: bytes, content_type: str):
    async def serve() -> Response:
        return Response(body, media_type=content_type, headers=PAGE_HEADERS)

    return serve
