"""Client/AsyncClient against a scripted real HTTP server: decoding, retries honouring Retry-After, no retry
of validation errors, typed errors, API key, timeouts, injected httpx clients."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from quickstep.client import (
    AsyncClient,
    AuthError,
    Client,
    ConnectionFailedError,
    GatewayTimeoutError,
    NotFoundError,
    RateLimitedError,
    RetryPolicy,
    UnavailableError,
    ValidationError,
)

from tests.helpers import free_port

FAST = RetryPolicy(max_retries=3, backoff_base_s=0.001, backoff_max_s=0.002, jitter=0.0, seed=0)
FULL = {"error": {"code": "queue_full", "message": "queue of model 'm' is full; retry after 1 s"}}


def test_generate_decodes_images_with_seed_index_and_latency(scripted):
    url, state = scripted
    with Client(url, retry=FAST) as c:
        res = c.generate(n=3, steps=2, seed=40, model="m", scale=1)
    assert (res.seed, res.steps, res.model, res.latency_ms, res.attempts) == (40, 2, "m", 1.5, 1)
    assert [im.index for im in res.images] == [0, 1, 2]
    assert [im.seed for im in res.images] == [40, 40, 40]
    assert [im.image.getpixel((0, 0)) for im in res.images] == [40, 41, 42]  # decoded PNG pixels
    assert res.images[0].image.size == (4, 4) and res.elapsed_ms > 0
    assert state.requests[0]["body"] == {"n": 3, "steps": 2, "seed": 40, "model": "m", "format": "png", "scale": 1}


def test_429_with_retry_after_is_retried_then_succeeds(scripted):
    url, state = scripted
    state.queue += [(429, {"Retry-After": "0.3"}, FULL), (429, {"Retry-After": "0.3"}, FULL)]
    t0 = time.perf_counter()
    with Client(url, retry=FAST) as c:
        res = c.generate(seed=5)
    waited = time.perf_counter() - t0
    assert state.hits == 3 and res.attempts == 3 and res.seed == 5
    assert waited >= 0.6  # the server's Retry-After was honoured (backoff alone would be ~3 ms)


def test_503_is_retried_with_backoff_when_no_retry_after(scripted):
    url, state = scripted
    state.queue += [(503, {}, {"error": {"code": "not_ready", "message": "warming up"}})]
    with Client(url, retry=FAST) as c:
        assert c.generate().attempts == 2
    assert state.hits == 2


@pytest.mark.parametrize("status,cls", [(400, ValidationError), (401, AuthError), (404, NotFoundError),
                                        (413, ValidationError), (422, ValidationError)])
def test_client_errors_are_never_retried_and_carry_code_and_message(scripted, status, cls):
    url, state = scripted
    state.queue += [(status, {"Retry-After": "0"}, {"error": {"code": f"c{status}", "message": f"m{status}"}})] * 3
    with Client(url, retry=FAST) as c, pytest.raises(cls) as ei:
        c.generate(n=2)
    assert state.hits == 1
    assert (ei.value.status, ei.value.code, ei.value.message, ei.value.attempts) == (status, f"c{status}",
                                                                                     f"m{status}", 1)


def test_retries_exhausted_raise_rate_limited_with_retry_after(scripted):
    url, state = scripted
    state.queue += [(429, {"Retry-After": "0"}, FULL)] * 5
    with Client(url, retry=FAST.__class__(max_retries=2, backoff_base_s=0.001, jitter=0.0)) as c:
        with pytest.raises(RateLimitedError) as ei:
            c.generate()
    assert state.hits == 3 and ei.value.attempts == 3
    assert ei.value.code == "queue_full" and ei.value.retry_after == 0.0


def test_invalid_arguments_are_rejected_before_sending(scripted):
    url, state = scripted
    with Client(url, retry=FAST) as c:
        for kwargs in ({"n": 0}, {"format": "gif"}, {"seed": -1}, {"scale": 99}):
            with pytest.raises(ValidationError, match=next(iter(kwargs))):
                c.generate(**kwargs)
    assert state.hits == 0


def test_api_key_sent_as_bearer_and_from_environment(scripted, monkeypatch):
    url, state = scripted
    with Client(url, api_key="s3cret", retry=FAST) as c:
        c.generate()
    monkeypatch.setenv("QUICKSTEP_API_KEY", "from-env")
    monkeypatch.setenv("QUICKSTEP_URL", url)
    with Client(retry=FAST) as c:
        c.generate()
    assert [r["headers"].get("authorization") for r in state.requests] == ["Bearer s3cret", "Bearer from-env"]


def test_timeout_becomes_server_deadline_and_client_timeout_raises(scripted):
    url, state = scripted
    with Client(url, retry=FAST) as c:
        c.generate(timeout=2.5)
    assert state.requests[0]["headers"]["x-timeout-ms"] == "2500"
    state.delay_s = 1.0
    with Client(url, timeout=0.2, retry=FAST) as c, pytest.raises(GatewayTimeoutError) as ei:
        c.generate()
    assert ei.value.code == "client_timeout" and ei.value.status is None
    assert state.hits == 2  # timeouts are not retried by default (generation is not free)


def test_connection_refused_is_retried_then_raises():
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, retry=FAST) as c, pytest.raises(ConnectionFailedError) as ei:
        c.generate()
    assert ei.value.attempts == 4 and "cannot reach" in ei.value.message


def test_injected_httpx_client_is_used_and_left_open(scripted):
    url, state = scripted
    seen: list[str] = []
    http = httpx.Client(event_hooks={"request": [lambda r: seen.append(str(r.url))]}, headers={"X-Tenant": "t1"})
    with Client(url, http_client=http, retry=FAST) as c:
        c.generate()
    assert seen == [url + "/v1/generate"] and state.requests[0]["headers"]["x-tenant"] == "t1"
    assert not http.is_closed
    http.close()


def test_health(scripted):
    url, _ = scripted
    with Client(url) as c:
        h = c.health()
    assert h.live and h.ready and h.models == {"scripted": True}
    with Client(f"http://127.0.0.1:{free_port()}", retry=RetryPolicy.none()) as c:
        with pytest.raises(ConnectionFailedError):
            c.health()
        with pytest.raises(UnavailableError, match="not ready after"):
            c.wait_ready(timeout=0.2)


def test_async_client_retries_concurrently(scripted):
    url, state = scripted
    state.queue += [(429, {"Retry-After": "0.2"}, FULL)] * 2

    async def go():
        transport = httpx.AsyncHTTPTransport(retries=0)
        async with httpx.AsyncClient(transport=transport) as http:
            c = AsyncClient(url, retry=FAST, http_client=http)
            out = await asyncio.gather(*(c.generate(seed=s) for s in range(4)))
            assert not http.is_closed
            return out, await c.health()

    results, health = asyncio.run(go())
    assert sorted(r.seed for r in results) == [0, 1, 2, 3]
    assert sum(r.attempts for r in results) == 6 and state.hits == 6
    assert health.ready

    state.queue += [(422, {}, {"error": {"code": "invalid_request", "message": "n: too many"}})]

    async def bad():
        async with AsyncClient(url, retry=FAST) as c:
            await c.generate(n=2)

    with pytest.raises(ValidationError, match="n: too many"):
        asyncio.run(bad())
    assert state.hits == 7


def test_undecodable_image_raises_decode_error(scripted):
    import base64

    from quickstep.client import Client, DecodeError, QuickstepError

    url, state = scripted
    body = {"model": "scripted", "steps": 1, "seed": 0, "latency_ms": 1.0,
            "images": [{"index": 0, "b64": base64.b64encode(b"GIF89a-truncated").decode(), "mime": "image/png"}]}
    state.queue.append((200, {}, body))
    with Client(url) as c, pytest.raises(DecodeError) as e:
        c.generate(seed=1)
    assert isinstance(e.value, QuickstepError) and isinstance(e.value, ValueError)
    assert e.value.code == "decode_error" and "image 0" in e.value.message
