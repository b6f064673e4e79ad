"""Checks at the HTTP edge, before any route runs or any body byte is read.

- **API keys**: when keys are set, every path but ``/health`` and ``/metrics`` needs one (``/docs``,
  ``/redoc`` and ``/openapi.json`` included: the schema names every field the server takes). The
  playground's static files need none where it is on: the page sends the user's key with every call it makes.
- **Host and Origin**: a keyless server on a loopback address trusts whoever can reach it, and a web page
  in the user's browser can: through DNS rebinding (a name of the attacker's that resolves to 127.0.0.1, so
  the browser sends ``Host: attacker.example``) or a cross-site request (``Origin: https://attacker.example``).
  Those are refused with a 403; loopback names and origins always pass, ``server.allowed_hosts`` and
  ``server.allowed_origins`` add others (a deployment behind a proxy names its own).
- **Ray Serve's override headers**: Serve's proxy lets any client lift its end-to-end timeout
  (``x-request-timeout-seconds: 0``) and keep a request running after it hangs up
  (``x-request-disconnect-disabled: ?1``). The proxy has already applied them when the request reaches us;
  answering at once with a 400 is what keeps a client from holding a slot with them.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from mmrag.serving.config import ServerConfig
from mmrag.serving.errors import AuthenticationError, InvalidRequestError, OpenAIError, clip
from mmrag.serving.openai.playground_api import is_page_path

OPEN_PATHS = frozenset({"/health", "/metrics"})  # probes and scrapers, never behind a key
RAY_OVERRIDE_HEADERS = ("x-request-timeout-seconds", "x-request-disconnect-disabled")
# A Host header: a DNS name or IPv4 address, or a bracketed IPv6 address, then an optional port.
_HOST_HEADER = re.compile(r"(?P<name>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


class PermissionDeniedError(OpenAIError):
    status_code = 403
    error_type = "permission_error"


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address (``127.0.0.0/8``, ``::1``; brackets allowed)."""
    host = host.lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str | None:
    """The name in a Host header without its port (``[::1]:8000`` -> ``::1``); None if malformed."""
    match = _HOST_HEADER.fullmatch(header)
    return match["name"].strip("[]").lower() if match else None


def origin_key(origin: str) -> str:
    """An origin as compared: lower case, without a trailing slash."""
    return origin.strip().lower().rstrip("/")


def is_loopback_origin(origin: str) -> bool:
    try:
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.hostname is not None and is_loopback(parts.hostname)
    except ValueError:  # a bad port or a broken IPv6 literal
        return False


class EdgeGuard:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streams and wrap client disconnects)."""

    def __init__(self, app: ASGIApp, server: ServerConfig, api_keys: list[str]):
        self.app = app
        self.server_host = server.host
        self.playground = server.playground
        self.api_keys = [key.encode() for key in api_keys]
        self.hosts = None if server.allowed_hosts is None else {h.lower().strip("[]") for h in server.allowed_hosts}
        self.origins = None if server.allowed_origins is None else {origin_key(o) for o in server.allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.check(scope)
            if error is not None:
                response = JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> OpenAIError | None:
        headers: dict[str, list[str]] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        guarded = self._loopback_default(scope)
        host = next((h for h in headers.get("host", []) if not self._host_allowed(h, guarded)), None)
        if host is not None:
            return PermissionDeniedError(
                f"Host {clip(host)} is not accepted by this server (a loopback server without API keys accepts "
                "loopback names only; set server.allowed_hosts to add names)",
                param="Host",
                code="host_not_allowed",
            )
        origin = next((o for o in headers.get("origin", []) if not self._origin_allowed(o, guarded)), None)
        if origin is not None:
            return PermissionDeniedError(
                f"requests from the web origin {clip(origin)} are not accepted by this server (set "
                "server.allowed_origins to add origins)",
                param="Origin",
                code="origin_not_allowed",
            )
        if self.api_keys and not self._open(scope["path"]) and not self._has_valid_key(headers):
            return AuthenticationError("invalid or missing API key", code="invalid_api_key")
        for name in RAY_OVERRIDE_HEADERS:
            if name in headers:
                return InvalidRequestError(
                    f"the {name} header is not accepted: the server's own timeouts apply", param=name
                )
        return None

    def _open(self, path: str) -> bool:
        return path in OPEN_PATHS or (self.playground and is_page_path(path))

    def _loopback_default(self, scope: Scope) -> bool:
        """True where the loopback-only default applies: no API keys, bound to a loopback address, and the
        connection arrived on one (``scope["server"]`` is the socket's own address; test clients put a
        placeholder name there)."""
        server = scope.get("server")
        local = server[0] if server else self.server_host
        return not self.api_keys and is_loopback(self.server_host) and is_loopback(local)

    def _host_allowed(self, header: str, guarded: bool) -> bool:
        if _unchecked(self.hosts, guarded):
            return True
        name = host_name(header)
        return name is not None and (is_loopback(name) or name in (self.hosts or ()))

    def _origin_allowed(self, origin: str, guarded: bool) -> bool:
        if _unchecked(self.origins, guarded):
            return True
        return is_loopback_origin(origin) or origin_key(origin) in (self.origins or ())

    def _has_valid_key(self, headers: dict[str, list[str]]) -> bool:
        scheme, _, token = (headers.get("authorization") or [""])[-1].partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        # Compare against every key in constant time: no early exit that leaks which prefix matched.
        return any([hmac.compare_digest(token.encode(), key) for key in self.api_keys])


def _unchecked(accepted: set[str] | None, guarded: bool) -> bool:
    """Anything passes: no list is configured and the loopback default does not apply, or the list has '*'."""
    return (accepted is None and not guarded) or (accepted is not None and "*" in accepted)
