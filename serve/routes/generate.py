"""POST /v1/generate: parse -> service -> JSON (or the raw image with `Accept: image/<fmt>` and n = 1)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from ..deps import ServiceDep, TimeoutDep
from ..errors import InvalidRequest, NotAcceptable
from ..schemas import ErrorResponse, GenerateRequest, GenerateResponse, ImageOut
from ..service import MIME

router = APIRouter(tags=["generate"])

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 406, 413, 422, 429, 431, 503, 504)}
_RAW = {v: k for k, v in MIME.items()}


@contextlib.asynccontextmanager
async def disconnect_watch(request: Request) -> AsyncIterator[asyncio.Event]:
    """An Event set when the client disconnects (the body is already read, so the next ASGI message is the
    disconnect); the batcher drops the request's work before it runs if it is set."""
    gone = asyncio.Event()

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone.set()
                return

    task = asyncio.get_running_loop().create_task(watch())
    try:
        yield gone
    finally:
        task.cancel()


_JSON_RANGES = frozenset({"application/json", "application/*", "*/*", "*"})


def raw_format(accept: str | None) -> str | None:
    """The image format a client asked for in Accept (image/png|jpeg|webp; image/* = png), None for JSON;
    NotAcceptable (406) when Accept lists nothing this route produces (first usable entry wins)."""
    if not accept or not accept.strip():
        return None
    for part in accept.split(","):
        mime = part.split(";")[0].strip().lower()
        if mime in _JSON_RANGES:
            return None
        if mime in _RAW:
            return _RAW[mime]
        if mime == "image/*":
            return "png"
    raise NotAcceptable(f"Accept: {accept[:100]!r} lists no type this route produces; accept application/json, "
                        "or image/png, image/jpeg or image/webp for a single raw image (n = 1)")


@router.post("/v1/generate", response_model=GenerateResponse, responses={
    **_ERRORS, 200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}},
                     "description": "JSON, or the raw image when Accept is image/png|jpeg|webp and n = 1"}})
async def generate(body: GenerateRequest, request: Request, service: ServiceDep, timeout_s: TimeoutDep,
                   accept: str | None = Header(None)) -> Response:
    """Generate `n` images; the seed used is always returned (drawn at random when omitted)."""
    fmt = raw_format(accept)
    if fmt is not None:
        if body.n != 1:
            raise InvalidRequest(f"n: a raw image response (Accept: {MIME[fmt]}) holds one image; got n={body.n}. "
                                 "Ask for application/json to get several")
        body = body.model_copy(update={"format": fmt})
    async with disconnect_watch(request) as gone:
        res = await service.generate(body, timeout_s=timeout_s, disconnected=gone.is_set)
    if fmt is not None:
        headers = {"X-Seed": str(res.seed), "X-Model": res.model, "X-Steps": str(res.steps),
                   "X-Latency-Ms": f"{res.latency_ms:.3f}"}
        if res.class_labels is not None:
            headers["X-Class-Label"] = str(res.class_labels[0])
        return Response(res.encoded[0], media_type=res.mime, headers=headers)
    out = GenerateResponse(
        model=res.model, steps=res.steps, seed=res.seed, latency_ms=round(res.latency_ms, 3),
        images=[ImageOut(index=i, b64=base64.b64encode(data).decode("ascii"), mime=res.mime,
                         class_label=None if res.class_labels is None else res.class_labels[i])
                for i, data in enumerate(res.encoded)])
    return Response(out.model_dump_json(), media_type="application/json")
