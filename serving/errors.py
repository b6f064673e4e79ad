"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

Messages reach clients: they name the field at fault and say what to change, echo at most a short prefix
of the client's input (:func:`clip`), and never carry a server path or a library's internals (those are
logged where the error is caught). Every 503 carries ``Retry-After``.
"""

from __future__ import annotations

from typing import Any

# How much of a client's value a message may echo, and a bound on any message (a safety net for echoes).
ECHO_CHARS = 200
MAX_MESSAGE_CHARS = 2000


def clip(value: Any, limit: int = ECHO_CHARS) -> str:
    """``repr`` of a client's value, cut to ``limit`` characters with its full length said after."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def bounded(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[:MAX_MESSAGE_CHARS] + f"... (message cut from {len(message)} characters)"


class OpenAIError(Exception):
    """An error a client should see as-is. ``param`` names the request field at fault."""

    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, **extra: Any):
        message = bounded(message)
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers: dict[str, str] = extra.get("headers", {})

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __reduce__(self):  # keep the fields when Ray pickles the exception across processes
        return (_rebuild, (type(self), self.message, self.param, self.code, self.headers))


def _rebuild(cls, message, param, code, headers):
    return cls(message, param=param, code=code, headers=headers)


class InvalidRequestError(OpenAIError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(OpenAIError):
    status_code = 401
    error_type = "authentication_error"


class ModelNotFoundError(OpenAIError):
    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, model: str, **kwargs: Any):
        kwargs.setdefault("param", "model")
        kwargs.setdefault("code", "model_not_found")
        super().__init__(f"The model {clip(model)} does not exist.", **kwargs)


class PayloadTooLargeError(OpenAIError):
    status_code = 413
    error_type = "invalid_request_error"


class NotFoundError(OpenAIError):
    """Something the request names (a retrieval collection) does not exist."""

    status_code = 404
    error_type = "invalid_request_error"


class _RetryLater(OpenAIError):
    """A 503: the client should retry after ``retry_after_s`` (sent as ``Retry-After``)."""

    status_code = 503

    def __init__(self, message: str, *, retry_after_s: int = 1, **kwargs: Any):
        kwargs["headers"] = {"Retry-After": str(retry_after_s), **(kwargs.get("headers") or {})}
        super().__init__(message, **kwargs)


class OverloadedError(_RetryLater):
    """Queues are full."""

    error_type = "server_overloaded"


class ServiceUnavailableError(_RetryLater):
    error_type = "service_unavailable"


class EngineUnavailableError(ServiceUnavailableError):
    """The LLM stage cannot serve (loading, dead, restarting)."""
