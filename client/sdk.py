"""`Client` / `AsyncClient`: the Python SDK over the HTTP contract (DESIGN.md "Serving contract").

Only `quickstep.serve.schemas` of the project is imported: the SDK talks to any Quickstep server over HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import pydantic
from PIL import Image
from quickstep.serve.schemas import GenerateRequest, GenerateResponse, HealthStatus, ModelInfo, ModelList

from quickstep import __version__

from .errors import (
    ConnectionFailedError,
    DecodeError,
    GatewayTimeoutError,
    QuickstepError,
    UnavailableError,
    ValidationError,
    error_class,
    parse_error_body,
)
from .retry import RetryPolicy, parse_retry_after

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 60.0


def default_url() -> str:
    """QUICKSTEP_URL, else http://127.0.0.1:8000."""
    return os.environ.get("QUICKSTEP_URL") or DEFAULT_URL


# ------------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class GeneratedImage:
    """One image of a response; its noise came from numpy.random.default_rng([seed, index]) on the server."""

    image: Image.Image
    index: int
    seed: int
    mime: str
    data: bytes = field(repr=False)
    class_label: int | None = None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the encoded bytes exactly as the server sent them."""
        with open(path, "wb") as f:
            f.write(self.data)


@dataclass(frozen=True)
class GenerateResult:
    """A decoded POST /v1/generate answer: images plus the request's seed, steps, model and server latency."""

    images: list[GeneratedImage]
    seed: int
    steps: int
    model: str
    latency_ms: float
    elapsed_ms: float
    attempts: int = 1

    @property
    def pil_images(self) -> list[Image.Image]:
        return [im.image for im in self.images]

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class Health:
    """Liveness and readiness of a server (GET /health/live, /health/ready)."""

    live: bool
    ready: bool
    status: str
    models: dict[str, bool]


# ------------------------------------------------------------------------------------------------ shared logic
def build_generate_body(n: int, steps: int | None, seed: int | None, class_label: int | None, model: str | None,
                        format: str, scale: int) -> dict[str, Any]:
    """The request body, validated with the shared schema (bad input -> ValidationError, nothing sent)."""
    try:
        req = GenerateRequest(n=n, steps=steps, seed=seed, class_label=class_label, model=model, format=format,
                              scale=scale)
    except pydantic.ValidationError as e:
        msg = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
                        for err in e.errors())
        raise ValidationError(msg, code="invalid_request") from None
    return req.model_dump(exclude_none=True)


def decode_generate(payload: GenerateResponse, elapsed_ms: float, attempts: int) -> GenerateResult:
    """Base64 -> bytes -> PIL image, keeping index, seed and class label; DecodeError when an image is unreadable."""
    images = []
    for im in payload.images:
        try:
            data = base64.b64decode(im.b64)
            pil = Image.open(io.BytesIO(data))
            pil.load()
        except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as e:
            raise DecodeError(f"image {im.index} of the response cannot be decoded ({type(e).__name__}: {e})",
                              code="decode_error", attempts=attempts) from e
        images.append(GeneratedImage(image=pil, index=im.index, seed=payload.seed, mime=im.mime, data=data,
                                     class_label=im.class_label))
    return GenerateResult(images=images, seed=payload.seed, steps=payload.steps, model=payload.model,
                          latency_ms=payload.latency_ms, elapsed_ms=elapsed_ms, attempts=attempts)


def error_from_response(resp: httpx.Response, attempts: int) -> QuickstepError:
    """The typed error for a non-2xx response, with the server's code and message."""
    code, message = parse_error_body(resp.status_code, resp.content, resp.headers.get("content-type", ""))
    cls = error_class(resp.status_code)
    return cls(message, status=resp.status_code, code=code, retry_after=parse_retry_after(resp.headers.get("retry-after")),
               headers=resp.headers, attempts=attempts)


def error_from_transport(exc: httpx.TransportError, url: str, attempts: int) -> QuickstepError:
    """ConnectionFailedError / GatewayTimeoutError(code='client_timeout') for a request that got no answer."""
    if isinstance(exc, httpx.TimeoutException):
        return GatewayTimeoutError(f"no answer from {url} within the client timeout ({type(exc).__name__})",
                                   code="client_timeout", attempts=attempts)
    return ConnectionFailedError(f"cannot reach {url}: {exc or type(exc).__name__}", code="connection_failed",
                                 attempts=attempts)


def _parse(model: type[pydantic.BaseModel], resp: httpx.Response, attempts: int) -> Any:
    try:
        return model.model_validate_json(resp.content)
    except pydantic.ValidationError as e:
        raise QuickstepError(f"unexpected response from {resp.request.url}: {e.errors()[0]['msg']}",
                             status=resp.status_code, code="bad_response", attempts=attempts) from None


class _Base:
    """Configuration shared by Client and AsyncClient."""

    def __init__(self, url: str | None, api_key: str | None, timeout: float | httpx.Timeout | None,
                 retry: RetryPolicy | None, headers: Mapping[str, str] | None):
        self.url = (url or default_url()).rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        self.api_key = api_key if api_key is not None else (os.environ.get("QUICKSTEP_API_KEY") or None)
        self.timeout = httpx.Timeout(DEFAULT_TIMEOUT_S) if timeout is None else (
            timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(float(timeout)))
        self.retry = retry if retry is not None else RetryPolicy()
        self._rng = random.Random(self.retry.seed)
        self._headers = {"User-Agent": f"quickstep-client/{__version__}", **(headers or {})}
        if self.api_key:
            self._headers["Authorization"] = f"Bearer {self.api_key}"

    def _request_args(self, path: str, timeout_s: float | None) -> tuple[str, dict[str, str], httpx.Timeout]:
        headers = dict(self._headers)
        timeout = self.timeout
        if timeout_s is not None:
            if timeout_s <= 0:
                raise ValidationError(f"timeout must be > 0 seconds, got {timeout_s}", code="invalid_request")
            # the server's deadline for this request: whole milliseconds >= 1 (the server answers 422 beyond its limit)
            headers["X-Timeout-Ms"] = str(max(1, round(timeout_s * 1000.0)))
            timeout = httpx.Timeout(timeout_s + 5.0)  # allow the server to answer 504 itself
        return self.url + path, headers, timeout

    def _retry_wait(self, attempt: int, err: QuickstepError) -> float | None:
        """Seconds to wait before retrying after `err` (None: do not retry)."""
        if attempt >= self.retry.max_retries:
            return None
        if err.status is None:
            timeout = err.code == "client_timeout"
            if (timeout and not self.retry.retry_timeouts) or (not timeout and not self.retry.retry_connect_errors):
                return None
            return self.retry.delay(attempt, None, self._rng)
        if err.status not in self.retry.retry_statuses:
            return None
        return self.retry.delay(attempt, err.retry_after, self._rng)

    @staticmethod
    def _health(live: httpx.Response | None, ready: httpx.Response | None) -> Health:
        status, models = "unavailable", {}
        for r in (ready, live):
            if r is not None:
                try:
                    h = HealthStatus.model_validate_json(r.content)
                except pydantic.ValidationError:
                    continue
                status, models = h.status, h.models
                break
        return Health(live=live is not None and live.status_code == 200,
                      ready=ready is not None and ready.status_code == 200, status=status, models=models)


# ------------------------------------------------------------------------------------------------ sync
class Client(_Base):
    """Synchronous client. `Client(url, api_key=..., timeout=..., retry=RetryPolicy(...), http_client=...)`.

    Pass your own `httpx.Client` (custom transport, proxies, TLS) as `http_client`; it is not closed by us.
    """

    def __init__(self, url: str | None = None, *, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = None, retry: RetryPolicy | None = None,
                 headers: Mapping[str, str] | None = None, http_client: httpx.Client | None = None):
        super().__init__(url, api_key, timeout, retry, headers)
        self._owns = http_client is None
        self._http = http_client if http_client is not None else httpx.Client()

    def close(self) -> None:
        if self._owns:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, path: str, *, json: Any = None, timeout_s: float | None = None,
              ok: tuple[int, ...] = (200,)) -> tuple[httpx.Response, int]:
        """One logical request with retries; returns (response, attempts) or raises a QuickstepError."""
        url, headers, timeout = self._request_args(path, timeout_s)
        attempt = 0
        while True:
            try:
                resp = self._http.request(method, url, json=json, headers=headers, timeout=timeout)
                if resp.status_code in ok:
                    return resp, attempt + 1
                err = error_from_response(resp, attempt + 1)
            except httpx.TransportError as e:
                err = error_from_transport(e, url, attempt + 1)
            wait = self._retry_wait(attempt, err)
            if wait is None:
                raise err
            time.sleep(wait)
            attempt += 1

    def generate(self, n: int = 1, steps: int | None = None, seed: int | None = None,
                 class_label: int | None = None, model: str | None = None, format: str = "png", scale: int = 1,
                 *, timeout: float | None = None) -> GenerateResult:
        """POST /v1/generate; `timeout` (s) also becomes the server-side deadline (X-Timeout-Ms)."""
        body = build_generate_body(n, steps, seed, class_label, model, format, scale)
        t0 = time.perf_counter()
        resp, attempts = self._send("POST", "/v1/generate", json=body, timeout_s=timeout)
        payload = _parse(GenerateResponse, resp, attempts)
        return decode_generate(payload, (time.perf_counter() - t0) * 1000.0, attempts)

    def models(self) -> list[ModelInfo]:
        """GET /v1/models."""
        resp, attempts = self._send("GET", "/v1/models")
        return _parse(ModelList, resp, attempts).models

    def model(self, name: str) -> ModelInfo:
        """GET /v1/models/{name} (NotFoundError when unknown)."""
        resp, attempts = self._send("GET", f"/v1/models/{quote(name, safe='')}")
        return _parse(ModelInfo, resp, attempts)

    def health(self) -> Health:
        """Liveness and readiness (a 503 'loading' is an answer, not an error; unreachable raises)."""
        live, _ = self._send("GET", "/health/live", ok=(200, 503))
        ready, _ = self._send("GET", "/health/ready", ok=(200, 503))
        return self._health(live, ready)

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.1) -> Health:
        """Poll readiness until ready (UnavailableError after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                h = self.health()
                if h.ready:
                    return h
            except ConnectionFailedError:
                h = None
            if time.monotonic() > deadline:
                raise _not_ready(self.url, timeout, h)
            time.sleep(interval)


# ------------------------------------------------------------------------------------------------ async
class AsyncClient(_Base):
    """asyncio client with the same API as Client (`await client.generate(...)`); accepts an httpx.AsyncClient."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = None, retry: RetryPolicy | None = None,
                 headers: Mapping[str, str] | None = None, http_client: httpx.AsyncClient | None = None):
        super().__init__(url, api_key, timeout, retry, headers)
        self._owns = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient()

    async def aclose(self) -> None:
        if self._owns:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, method: str, path: str, *, json: Any = None, timeout_s: float | None = None,
                    ok: tuple[int, ...] = (200,)) -> tuple[httpx.Response, int]:
        url, headers, timeout = self._request_args(path, timeout_s)
        attempt = 0
        while True:
            try:
                resp = await self._http.request(method, url, json=json, headers=headers, timeout=timeout)
                if resp.status_code in ok:
                    return resp, attempt + 1
                err = error_from_response(resp, attempt + 1)
            except httpx.TransportError as e:
                err = error_from_transport(e, url, attempt + 1)
            wait = self._retry_wait(attempt, err)
            if wait is None:
                raise err
            await asyncio.sleep(wait)
            attempt += 1

    async def generate(self, n: int = 1, steps: int | None = None, seed: int | None = None,
                       class_label: int | None = None, model: str | None = None, format: str = "png",
                       scale: int = 1, *, timeout: float | None = None) -> GenerateResult:
        """POST /v1/generate (see Client.generate)."""
        body = build_generate_body(n, steps, seed, class_label, model, format, scale)
        t0 = time.perf_counter()
        resp, attempts = await self._send("POST", "/v1/generate", json=body, timeout_s=timeout)
        payload = _parse(GenerateResponse, resp, attempts)
        return decode_generate(payload, (time.perf_counter() - t0) * 1000.0, attempts)

    async def models(self) -> list[ModelInfo]:
        resp, attempts = await self._send("GET", "/v1/models")
        return _parse(ModelList, resp, attempts).models

    async def model(self, name: str) -> ModelInfo:
        resp, attempts = await self._send("GET", f"/v1/models/{quote(name, safe='')}")
        return _parse(ModelInfo, resp, attempts)

    async def health(self) -> Health:
        live, _ = await self._send("GET", "/health/live", ok=(200, 503))
        ready, _ = await self._send("GET", "/health/ready", ok=(200, 503))
        return self._health(live, ready)

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.1) -> Health:
        deadline = time.monotonic() + timeout
        while True:
            try:
                h = await self.health()
                if h.ready:
                    return h
            except ConnectionFailedError:
                h = None
            if time.monotonic() > deadline:
                raise _not_ready(self.url, timeout, h)
            await asyncio.sleep(interval)


def _not_ready(url: str, timeout: float, h: Health | None) -> UnavailableError:
    state = "unreachable" if h is None else f"status {h.status!r}"
    return UnavailableError(f"{url} not ready after {timeout:g} s ({state})", status=None, code="not_ready")
