"""Typed client errors carrying the server's {"error": {"code", "message"}} (DESIGN.md "Serving contract")."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from typing import Any


class QuickstepError(Exception):
    """Base of every client error: HTTP `status` (None when no response came), stable `code`, `message`."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "error",
                 retry_after: float | None = None, headers: Mapping[str, str] | None = None,
                 attempts: int = 1):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.headers = dict(headers or {})
        self.attempts = attempts

    def __str__(self) -> str:
        where = f"HTTP {self.status} " if self.status is not None else ""
        return f"{where}{self.code}: {self.message}"


class ValidationError(QuickstepError):
    """400/413/422, or a request the client rejected before sending: never retried."""


class PayloadTooLargeError(ValidationError):
    """413: the request body exceeds the server's limit."""


class AuthError(QuickstepError):
    """401/403: the API key is missing or wrong."""


class NotFoundError(QuickstepError):
    """404: unknown model or route."""


class RateLimitedError(QuickstepError):
    """429: the model's queue is full; `retry_after` holds the server's Retry-After (seconds)."""


class UnavailableError(QuickstepError):
    """503: not ready, shutting down or backend failure."""


class GatewayTimeoutError(QuickstepError, builtins.TimeoutError):
    """504 (the server's deadline passed) or code 'client_timeout' (no answer within the client's timeout)."""


class ServerError(QuickstepError):
    """Any other 5xx."""


class DecodeError(QuickstepError, builtins.ValueError):
    """A 2xx answer whose images cannot be decoded (bad base64, not an image): code 'decode_error'."""


class ConnectionFailedError(QuickstepError, builtins.ConnectionError):
    """No HTTP answer: the server could not be reached or dropped the connection."""


_BY_STATUS: dict[int, type[QuickstepError]] = {
    400: ValidationError, 401: AuthError, 403: AuthError, 404: NotFoundError, 413: PayloadTooLargeError,
    422: ValidationError, 429: RateLimitedError, 503: UnavailableError, 504: GatewayTimeoutError,
}


def error_class(status: int) -> type[QuickstepError]:
    """The exception type for an HTTP error status."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status >= 500:
        return ServerError
    return QuickstepError


def parse_error_body(status: int, body: bytes, content_type: str) -> tuple[str, str]:
    """(code, message) from the contract's {"error": {...}}, FastAPI's {"detail": ...} or plain text."""
    default_code = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                    413: "payload_too_large", 422: "invalid_request", 429: "rate_limited",
                    503: "unavailable", 504: "deadline_exceeded"}.get(status, f"http_{status}")
    if "json" in content_type.lower():
        try:
            import json

            data: Any = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict):
            err = data.get("error")
            if isinstance(err, dict) and "message" in err:
                return str(err.get("code") or default_code), str(err["message"])
            if "detail" in data:
                return default_code, str(data["detail"])
    text = body.decode("utf-8", "replace").strip().splitlines()
    return default_code, (text[0][:300] if text else f"HTTP {status} with an empty body")
