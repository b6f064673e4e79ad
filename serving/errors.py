"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

from __future__ import annotations

from typing import Any


class OpenAIError(Exception):
    """An error a client should see as-is. ``param`` names the request field at fault."""

    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, **extra: Any):
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
        super().__init__(f"The model {model!r} does not exist.", **kwargs)


class PayloadTooLargeError(OpenAIError):
    status_code = 413
    error_type = "invalid_request_error"


class OverloadedError(OpenAIError):
    """Queues are full: the client should retry after ``retry_after_s``."""

    status_code = 503
    error_type = "server_overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1, **kwargs: Any):
        kwargs.setdefault("headers", {"Retry-After": str(retry_after_s)})
        super().__init__(message, **kwargs)


class ServiceUnavailableError(OpenAIError):
    status_code = 503
    error_type = "service_unavailable"


class EngineUnavailableError(ServiceUnavailableError):
    """The LLM stage cannot serve (loading, dead, restarting)."""
