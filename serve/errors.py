"""Errors a client can cause or observe, each with its HTTP status and a stable code."""

from __future__ import annotations


class ServeError(Exception):
    """Rendered as {"error": {"code", "message"}} with `status` (and optional headers)."""

    status: int = 500
    code: str = "internal"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequest(ServeError):
    status, code = 422, "invalid_request"


class ModelNotFound(ServeError):
    status, code = 404, "model_not_found"


class QueueFull(ServeError):
    status, code = 429, "queue_full"


class NotReady(ServeError):
    status, code = 503, "not_ready"


class BackendFailure(ServeError):
    status, code = 503, "backend_failure"


class ShuttingDown(ServeError):
    status, code = 503, "shutting_down"


class DeadlineExceeded(ServeError):
    status, code = 504, "deadline_exceeded"


class ClientGone(ServeError):
    """The client disconnected before its work ran (never sent: there is nobody to send it to)."""

    status, code = 499, "client_closed_request"


class NotAcceptable(ServeError):
    """The Accept header lists no media type the route can produce."""

    status, code = 406, "not_acceptable"
