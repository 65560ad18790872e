"""The SDK against a real `quickstep-serve` process on a tiny exported bundle (127.0.0.1)."""

from __future__ import annotations

import numpy as np
import pytest
from quickstep.client import Client, NotFoundError, RetryPolicy, ValidationError

RETRY = RetryPolicy(max_retries=3, backoff_base_s=0.01, seed=0)


def test_round_trip_is_deterministic_per_seed_and_index(real_server):
    with Client(real_server.url, retry=RETRY) as c:
        a = c.generate(n=4, steps=2, seed=11)
        b = c.generate(n=2, steps=2, seed=11)
        other = c.generate(n=1, steps=2, seed=12)
        one = c.generate(n=1, steps=1, seed=11, scale=3, format="webp")
    assert (a.seed, a.steps, a.model, len(a)) == (11, 2, "tiny-consistency", 4)
    assert a.latency_ms > 0
    assert [im.index for im in a.images] == [0, 1, 2, 3]
    px = [np.asarray(im.image) for im in a.images]
    assert px[0].shape == (8, 8) and px[0].dtype == np.uint8
    # image k depends only on (seed, k): a smaller request reproduces the first images exactly
    assert all(np.array_equal(px[k], np.asarray(b.images[k].image)) for k in range(2))
    assert not np.array_equal(px[0], np.asarray(other.images[0].image))
    assert not np.array_equal(px[0], px[1])
    assert one.images[0].mime == "image/webp" and one.images[0].image.size == (24, 24) and one.steps == 1


def test_models_model_and_health(real_server):
    with Client(real_server.url) as c:
        models = c.models()
        info = c.model("tiny-consistency")
        health = c.health()
        with pytest.raises(NotFoundError) as ei:
            c.model("no-such-model")
        with pytest.raises(NotFoundError):
            c.generate(model="no-such-model")
    assert [m.name for m in models] == ["tiny-consistency"]
    assert info.image_shape == [1, 8, 8] and info.steps_supported == [1, 2] and info.ready
    assert health.live and health.ready and health.models == {"tiny-consistency": True}
    assert ei.value.status == 404 and ei.value.code == "model_not_found" and "no-such-model" in ei.value.message


def test_422_is_not_retried(real_server):
    """Counted server-side: /metrics shows exactly one more 422 on /v1/generate per failing call."""
    before = real_server.metric("quickstep_requests_total", route="/v1/generate", status="422")
    with Client(real_server.url, retry=RetryPolicy(max_retries=5, backoff_base_s=0.01)) as c:
        with pytest.raises(ValidationError) as e1:
            c.generate(n=100)
        with pytest.raises(ValidationError) as e2:
            c.generate(steps=7)
    after = real_server.metric("quickstep_requests_total", route="/v1/generate", status="422")
    assert after - before == 2
    assert e1.value.status == 422 and e1.value.code == "invalid_request" and e1.value.message.startswith("n:")
    assert e2.value.message.startswith("steps:") and "[1, 2]" in e2.value.message
    assert e1.value.attempts == 1


@pytest.mark.slow
def test_real_429_flood_is_retried_until_success(client_bundle, tmp_path):
    """A real server with --max-queue 1 --max-batch 1 flooded by 24 concurrent requests answers some 429s
    (with Retry-After); the AsyncClient retries them and every request ends in success."""
    import asyncio

    from quickstep.client import AsyncClient

    from .conftest import start_serve, stop_serve

    srv = start_serve(client_bundle, tmp_path / "serve.log", "--max-queue", "1", "--max-batch", "1",
                      "--max-wait-ms", "0")
    try:
        async def flood():
            async with AsyncClient(srv.url, retry=RetryPolicy(max_retries=20, seed=0)) as c:
                return await asyncio.gather(*(c.generate(n=1, steps=2, seed=s) for s in range(24)))

        results = asyncio.run(flood())
        rejected = srv.metric("quickstep_requests_total", route="/v1/generate", status="429")
        ok = srv.metric("quickstep_requests_total", route="/v1/generate", status="200")
    finally:
        stop_serve(srv.proc)
    assert sorted(r.seed for r in results) == list(range(24))
    assert rejected > 0 and ok == 24
    assert sum(r.attempts - 1 for r in results) == rejected
