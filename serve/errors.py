"""Errors a client can cause or observe, each with its HTTP status and a stable code, and the error body of each
API the server speaks (Quickstep's own, OpenAI's images API, the Open Inference Protocol v2)."""

from __future__ import annotations

from typing import Any, Literal

Api = Literal["quickstep", "openai", "v2"]
APIS: tuple[Api, ...] = ("quickstep", "openai", "v2")


class ServeError(Exception):
    """Rendered in the error shape of the request's API with `status` (and optional headers); `param` names the
    offending field for OpenAI's error shape."""

    status: int = 500
    code: str = "internal"
    protocol_status: int | None = None  # the status the OpenAI and v2 routes answer instead (400 for bad input)

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.param = param

    def status_for(self, api: Api) -> int:
        return self.protocol_status if api != "quickstep" and self.protocol_status is not None else self.status


class InvalidRequest(ServeError):
    """Bad input: 422 on Quickstep's routes, 400 on the OpenAI and v2 routes (their protocols' convention)."""

    status, code, protocol_status = 422, "invalid_request", 400


class InvalidHeader(InvalidRequest):
    """A bad request header (X-Timeout-Ms): 422 on every route."""

    protocol_status = None


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


class UnsupportedMediaType(ServeError):
    status, code = 415, "unsupported_media_type"


# ----------------------------------------------------------------------------------------------- API error shapes
def api_of(path: str) -> Api:
    """Which API a request path belongs to: /v1/images/* is OpenAI's, /v2 and /v2/* the Open Inference Protocol's,
    everything else Quickstep's own."""
    if path.startswith("/v1/images/"):
        return "openai"
    if path == "/v2" or path.startswith("/v2/"):
        return "v2"
    return "quickstep"


def _openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(api: Api, status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """Quickstep: {"error": {code, message}}; OpenAI: {"error": {message, type, param, code}}; v2: {"error": msg}."""
    if api == "v2":
        return {"error": message}
    if api == "openai":
        return {"error": {"message": message, "type": _openai_type(status), "param": param, "code": code}}
    return {"error": {"code": code, "message": message}}
