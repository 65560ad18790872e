"""`create_app(settings)`: the FastAPI app - gateway middlewares (request metrics, header and body limits, API keys),
JSON errors in each API's shape, a lifespan that loads and warms every model, routes, and the Gradio UI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from quickstep import __version__

from .bundle import Bundle, BundleError, bundled_default, discover_bundles, load_bundle
from .errors import InvalidHeader, InvalidRequest, ServeError, api_of
from .metrics import ServeMetrics
from .middleware import (
    AuthMiddleware,
    BodyLimitMiddleware,
    HeaderLimitMiddleware,
    MetricsMiddleware,
    error_response,
)
from .schemas import MAX_SEED
from .service import GenerationService
from .settings import ServeSettings

log = logging.getLogger("quickstep.serve")

_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
                 415: "unsupported_media_type", 422: "invalid_request", 429: "queue_full",
                 431: "request_header_fields_too_large", 500: "internal",
                 503: "unavailable", 504: "deadline_exceeded"}


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
_OPENAI_HINTS = {
    "model": "a model id from GET /v1/models, or omitted for the default",
    "prompt": "a string naming one class of the model (GET /v1/models lists class_names), or '' for a random class",
    "n": "an integer from 1 to {max_n}",
    "size": "'WxH' at the model's native resolution or an integer multiple of it (GET /v1/models: sizes)",
    "response_format": "'b64_json'",
    "output_format": "'png', 'jpeg' or 'webp'",
    "user": "a string (ignored)",
    "steps": _FIELD_HINTS["steps"],
    "seed": _FIELD_HINTS["seed"],
    "class_label": _FIELD_HINTS["class_label"],
}
_HEADER_HINTS = {"x-timeout-ms": "a positive integer number of milliseconds from 1 to {max_timeout_ms} "
                                 "(this server's timeout)"}


def validation_message(exc: RequestValidationError, limits: dict[str, int], hints: dict[str, str] | None = None) -> str:
    """'field: problem (got X); allowed: ...' for every error, joined by '; '."""
    hints = _FIELD_HINTS if hints is None else hints
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        header = bool(loc) and loc[0] == "header"
        if header:
            loc = [loc[-1].title()]
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
            parts.append(f"{field}: unknown field; allowed fields: {', '.join(hints)}")
            continue
        text = f"{field}: {msg}"
        if "input" in err:
            got = repr(err["input"])
            text += f" (got {got[:60] + '...' if len(got) > 60 else got})"
        hint = (_HEADER_HINTS if header else hints).get(loc[-1].lower() if header else (loc[-1] if loc else ""))
        if hint:
            text += "; allowed: " + hint.format(**limits)
        parts.append(text)
    return "; ".join(parts) or "invalid request"


def render(request: Request, exc: ServeError) -> JSONResponse:
    """A ServeError in the shape and status of the request's API."""
    path = request.url.path
    return error_response(path, exc.status_for(api_of(path)), exc.code, exc.message, exc.headers, exc.param)


def install_error_handlers(app: FastAPI) -> None:
    """Every error is JSON in the shape of the request's API (errors.error_body); client input never yields a 500."""

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return render(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        path = request.url.path
        api = api_of(path)
        service = getattr(request.app.state, "service", None)
        settings = getattr(request.app.state, "settings", None)
        limits = {"max_n": service.max_n() if service is not None else 0,
                  "max_timeout_ms": settings.max_timeout_ms if settings is not None else 0}
        errors = exc.errors()
        locs = [tuple(e.get("loc", ())) for e in errors]
        if any(loc[:1] == ("header",) for loc in locs):  # a bad header is 422 on every API
            header_only = RequestValidationError([e for e in errors if tuple(e.get("loc", ()))[:1] == ("header",)])
            return render(request, InvalidHeader(validation_message(header_only, limits),
                                                 param=str(locs[0][-1]).title()))
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";")[0].strip().lower()
        if (request.method == "POST" and media != "application/json" and not media.endswith("+json")
                and any(loc[:1] == ("body",) for loc in locs)):
            return render(request, InvalidRequest(f"body: Content-Type must be application/json (got {ctype[:60]!r}); "
                                                  "send a JSON object such as {\"n\": 1}", param="Content-Type"))
        param = next((str(loc[1]) for loc, e in zip(locs, errors, strict=True) if len(loc) > 1 and loc[0] == "body"
                      and isinstance(loc[1], str) and e.get("type") != "json_invalid"), None)
        return render(request, InvalidRequest(validation_message(exc, limits, _OPENAI_HINTS if api == "openai" else None),
                                              param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        msg = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 400 and msg == "There was an error parsing the body":  # fastapi: undecodable body
            cause = exc.__cause__
            why = f"{type(cause).__name__}: {str(cause)[:80]}" if cause is not None else "undecodable"
            return render(request, InvalidRequest(f"body: not valid JSON ({why}); send a UTF-8 JSON object such as "
                                                  "{\"n\": 1}"))
        if exc.status_code == 404:
            msg = f"no route {request.method} {path}; see /docs"
        return error_response(path, exc.status_code, _STATUS_CODES.get(exc.status_code, "http_error"), msg,
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(request.url.path, 500, "internal",
                              f"internal server error ({type(exc).__name__}); see the server log")


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

    app = FastAPI(title="Quickstep", version=__version__, lifespan=lifespan,
                  description="Low-latency 1-2 step image generation (DESIGN.md 'Serving contract').")
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = metrics
    install_error_handlers(app)
    from .routes import generate, health, models, openai, v2
    from .routes import metrics as metrics_route

    for r in (generate.router, openai.router, models.router, v2.router, health.router, metrics_route.router):
        app.include_router(r)
    # added innermost first: metrics -> header limit -> API keys -> body limit -> app
    app.add_middleware(BodyLimitMiddleware, max_body=settings.max_body_bytes)
    app.add_middleware(AuthMiddleware, keys=keys)
    app.add_middleware(HeaderLimitMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.cors_origins:  # outermost, so preflight requests never need an API key
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type", "Accept", "X-Timeout-Ms",
                                          "Inference-Header-Content-Length"],
                           expose_headers=["Inference-Header-Content-Length", "Retry-After"])
    if settings.ui:
        from .ui import mount_ui

        mount_ui(app, service)
    return app


__all__ = ["BundleError", "create_app", "resolve_bundles"]
