"""`create_app(settings)`: the FastAPI app - gateway middleware (API keys, body limit, request metrics),
JSON errors everywhere, a lifespan that loads and warms every model, routes, and the Gradio UI."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .bundle import Bundle, BundleError, bundled_default, discover_bundles, load_bundle
from .errors import ServeError
from .metrics import ServeMetrics
from .schemas import MAX_SEED
from .service import GenerationService
from .settings import ServeSettings

log = logging.getLogger("quickstep.serve")

HEALTH_PATHS = frozenset({"/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"})
MAX_HEADER_BYTES = 65_536  # all request header names + values; the HTTP parser (httptools) sets no limit
_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
                 415: "unsupported_media_type", 422: "invalid_request", 429: "queue_full",
                 431: "request_header_fields_too_large", 500: "internal",
                 503: "unavailable", 504: "deadline_exceeded"}


def error_body(code: str, message: str) -> dict[str, Any]:
    """The contract's error shape."""
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


# ----------------------------------------------------------------------------------------------- models
def resolve_bundles(settings: ServeSettings) -> list[Bundle]:
    """--bundle dirs, then every bundle in --models-dir; with neither, the bundled default model.  (The quality
    gate runs in GenerationService, once each backend knows the device it will run on.)"""
    paths: list[Path] = list(settings.bundle)
    if settings.models_dir is not None:
        paths += discover_bundles(settings.models_dir)
    if not paths:
        paths = [bundled_default()]
    return [load_bundle(p, verify=settings.verify_sha256) for p in paths]


# ----------------------------------------------------------------------------------------------- gateway
class GatewayMiddleware:
    """API keys (constant time, all routes but health probes), body-size limit, request counts and latency."""

    def __init__(self, app: ASGIApp, *, keys: list[str], max_body: int, metrics: ServeMetrics):
        self.app = app
        # keys are kept as SHA-256 digests: equal-length comparisons, so timing reveals neither the key nor its length
        self.keys = [hashlib.sha256(k.encode()).digest() for k in keys]
        self.max_body = max_body
        self.metrics = metrics

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

    @staticmethod
    def _route(scope: Scope) -> str:
        route = scope.get("route")
        path = getattr(route, "path", None)
        if path:
            return str(path)
        p = scope.get("path", "")
        if p == "/ui" or p.startswith("/ui/"):
            return "/ui"
        return "unmatched"

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
            await self._handle(scope, receive, send_tracked)
        finally:
            self.metrics.in_progress.dec()
            route = self._route(scope)
            self.metrics.requests.labels(route, scope.get("method", ""), str(status[0])).inc()
            self.metrics.request_latency.labels(route).observe(time.perf_counter() - t0)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        header_bytes = sum(len(k) + len(v) for k, v in scope.get("headers", []))
        if header_bytes > MAX_HEADER_BYTES:
            await error_response(431, "request_header_fields_too_large",
                                 f"request headers total {header_bytes} bytes; the limit is {MAX_HEADER_BYTES}",
                                 {"Connection": "close"})(scope, receive, send)
            return
        if self.keys and scope["path"] not in HEALTH_PATHS and not self._authorized(scope):
            await error_response(401, "unauthorized", "missing or invalid API key: send 'Authorization: Bearer <key>' "
                                 "or 'X-API-Key: <key>'", {"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        length = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                await error_response(400, "bad_request", "Content-Length is not an integer")(scope, receive, send)
                return
            if too_big:
                await self._too_large(scope, receive, send)
                return
        elif scope.get("method") in ("POST", "PUT", "PATCH"):
            # no length given (chunked): read up to the limit before the app sees anything, then replay
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
        await error_response(413, "payload_too_large", f"request body exceeds the limit of {self.max_body} bytes",
                             {"Connection": "close"})(scope, receive, send)


# ----------------------------------------------------------------------------------------------- errors
_FIELD_HINTS = {
    "n": "an integer from 1 to {max_n}",
    "steps": "an integer among the model's steps_supported (GET /v1/models)",
    "seed": f"an integer from 0 to {MAX_SEED}, or null for a random seed",
    "class_label": "an integer from 0 to num_classes - 1 (GET /v1/models), or null",
    "format": "'png', 'jpeg' or 'webp'",
    "scale": "an integer from 1 to 16",
    "model": "a model name from GET /v1/models, or null for the default",
}


def validation_message(exc: RequestValidationError, max_n: int) -> str:
    """'field: problem (got X); allowed: ...' for every error, joined by '; '."""
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        field = ".".join(loc) if loc else "body"
        msg = str(err.get("msg", "invalid"))
        etype = err.get("type", "")
        if etype == "json_invalid":
            parts.append(f"body: not valid JSON ({err.get('ctx', {}).get('error', msg)})")
            continue
        if etype == "missing" and field == "body":
            parts.append("body: a JSON object is required (e.g. {\"n\": 1})")
            continue
        if etype == "extra_forbidden":
            parts.append(f"{field}: unknown field; allowed fields: {', '.join(_FIELD_HINTS)}")
            continue
        text = f"{field}: {msg}"
        if "input" in err:
            got = repr(err["input"])
            text += f" (got {got[:60] + '...' if len(got) > 60 else got})"
        hint = _FIELD_HINTS.get(loc[-1] if loc else "")
        if hint:
            text += "; allowed: " + hint.format(max_n=max_n)
        parts.append(text)
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Every error is JSON {"error": {code, message}}; client input never yields a 500."""

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        service = getattr(request.app.state, "service", None)
        max_n = service.max_n() if service is not None else 0
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";")[0].strip().lower()
        if (request.method == "POST" and media != "application/json" and not media.endswith("+json")
                and any(tuple(e.get("loc", ()))[:1] == ("body",) for e in exc.errors())):
            return error_response(422, "invalid_request", f"body: Content-Type must be application/json "
                                  f"(got {ctype[:60]!r}); send a JSON object such as {{\"n\": 1}}")
        return error_response(422, "invalid_request", validation_message(exc, max_n))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 400 and msg == "There was an error parsing the body":  # fastapi: undecodable body
            cause = exc.__cause__
            why = f"{type(cause).__name__}: {str(cause)[:80]}" if cause is not None else "undecodable"
            return error_response(422, "invalid_request", f"body: not valid JSON ({why}); send a UTF-8 JSON "
                                  "object such as {\"n\": 1}")
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path}; see /docs"
        return error_response(exc.status_code, _STATUS_CODES.get(exc.status_code, "http_error"), msg,
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", f"internal server error ({type(exc).__name__}); see the server log")


# ----------------------------------------------------------------------------------------------- factory
def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """Build the app; bundles are read and verified now (BundleError on a bad one, QualityGateError on one whose
    quality report flags the backend on this device), backends load in the lifespan:
    /health/ready answers 503 until every model is loaded and warmed."""
    settings = settings or ServeSettings()
    metrics = ServeMetrics()
    bundles = resolve_bundles(settings)
    service = GenerationService(bundles, settings, metrics)
    keys = settings.resolved_api_keys()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.get_running_loop().create_task(service.load_all(), name="quickstep-load")
        app.state.loader = loader
        try:
            yield
        finally:
            if not loader.done():
                loader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loader
            await service.close()

    app = FastAPI(title="Quickstep", version="0.1.0", lifespan=lifespan,
                  description="Low-latency 1-2 step image generation (DESIGN.md 'Serving contract').")
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = metrics
    install_error_handlers(app)
    from .routes import generate, health, models
    from .routes import metrics as metrics_route

    for r in (generate.router, models.router, health.router, metrics_route.router):
        app.include_router(r)
    app.add_middleware(GatewayMiddleware, keys=keys, max_body=settings.max_body_bytes, metrics=metrics)
    if settings.cors_origins:  # outermost, so preflight requests never need an API key
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type", "Accept"])
    if settings.ui:
        from .ui import mount_ui

        mount_ui(app, service)
    return app


__all__ = ["BundleError", "create_app", "resolve_bundles"]
