"""The gateway as small raw-ASGI middlewares, outermost first: request metrics, header-size limit, API keys,
body-size limit.  Their own error answers use the error shape of the request's API (errors.api_of)."""

from __future__ import annotations

import hashlib
import hmac
import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import api_of, error_body
from .metrics import ServeMetrics

HEALTH_PATHS = frozenset({"/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"})
MAX_HEADER_BYTES = 65_536  # all request header names + values; the HTTP parser (httptools) sets no limit


def error_response(path: str, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   param: str | None = None) -> JSONResponse:
    """An error answer in the shape of the API that `path` belongs to."""
    return JSONResponse(error_body(api_of(path), status, code, message, param), status_code=status, headers=headers)


class MetricsMiddleware:
    """Requests by api, route, method and status; end-to-end latency by api and route; requests in progress."""

    def __init__(self, app: ASGIApp, *, metrics: ServeMetrics):
        self.app = app
        self.metrics = metrics

    @staticmethod
    def _route(scope: Scope) -> str:
        path = getattr(scope.get("route"), "path", None)
        if path:
            return str(path)
        p = scope.get("path", "")
        return "/ui" if p == "/ui" or p.startswith("/ui/") else "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, send_tracked)
        finally:
            self.metrics.in_progress.dec()
            route, api = self._route(scope), api_of(scope.get("path", ""))
            self.metrics.requests.labels(api, route, scope.get("method", ""), str(status[0])).inc()
            self.metrics.request_latency.labels(api, route).observe(time.perf_counter() - t0)


class HeaderLimitMiddleware:
    """431 when the request's header names and values total more than MAX_HEADER_BYTES."""

    def __init__(self, app: ASGIApp, *, max_bytes: int = MAX_HEADER_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(k) + len(v) for k, v in scope.get("headers", []))
            if size > self.max_bytes:
                await error_response(scope["path"], 431, "request_header_fields_too_large",
                                     f"request headers total {size} bytes; the limit is {self.max_bytes}",
                                     {"Connection": "close"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AuthMiddleware:
    """API keys ('Authorization: Bearer <key>' or 'X-API-Key: <key>') on every route but the health probes,
    compared in constant time against every key; off when no key is configured."""

    def __init__(self, app: ASGIApp, *, keys: list[str]):
        self.app = app
        # keys are kept as SHA-256 digests: equal-length comparisons, so timing reveals neither the key nor its length
        self.keys = [hashlib.sha256(k.encode()).digest() for k in keys]

    def _authorized(self, scope: Scope) -> bool:
        given: list[bytes] = []
        for k, v in scope.get("headers", []):
            if k == b"authorization" and v[:7].lower() == b"bearer ":
                given.append(v[7:].strip())
            elif k == b"x-api-key":
                given.append(v.strip())
        ok = False
        for g in given:
            d = hashlib.sha256(g).digest()
            for key in self.keys:  # compare against every key: timing does not reveal which matched
                ok |= hmac.compare_digest(d, key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and self.keys and scope["path"] not in HEALTH_PATHS
                and not self._authorized(scope)):
            await error_response(scope["path"], 401, "unauthorized", "missing or invalid API key: send "
                                 "'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                                 {"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over `max_body` bytes: by Content-Length, or (chunked) read up to the limit before the app
    sees anything, then replayed."""

    def __init__(self, app: ASGIApp, *, max_body: int):
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                await error_response(scope["path"], 400, "bad_request",
                                     "Content-Length is not an integer")(scope, receive, send)
                return
            if too_big:
                await self._too_large(scope, receive, send)
                return
        elif scope.get("method") in ("POST", "PUT", "PATCH"):
            chunks, size, more = [], 0, True
            while more:
                msg = await receive()
                if msg["type"] != "http.request":
                    break
                body = msg.get("body", b"")
                size += len(body)
                if size > self.max_body:
                    await self._too_large(scope, receive, send)
                    return
                chunks.append(body)
                more = msg.get("more_body", False)
            buffered = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def replay() -> Message:
                return buffered.pop() if buffered else await receive()

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(scope["path"], 413, "payload_too_large",
                             f"request body exceeds the limit of {self.max_body} bytes",
                             {"Connection": "close"})(scope, receive, send)
