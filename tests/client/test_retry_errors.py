"""RetryPolicy backoff/jitter bounds, Retry-After parsing and the status -> exception mapping (no server)."""

from __future__ import annotations

import email.utils
import random

import pytest
from quickstep.client import (
    AuthError,
    GatewayTimeoutError,
    NotFoundError,
    PayloadTooLargeError,
    QuickstepError,
    RateLimitedError,
    RetryPolicy,
    ServerError,
    UnavailableError,
    ValidationError,
)
from quickstep.client.errors import error_class, parse_error_body
from quickstep.client.retry import parse_retry_after


def test_backoff_is_exponential_capped_and_jittered_within_bounds():
    p = RetryPolicy(backoff_base_s=0.5, backoff_max_s=3.0, jitter=0.5)
    rng = random.Random(0)
    for attempt in range(8):
        nominal = min(3.0, 0.5 * 2**attempt)
        waits = [p.backoff(attempt, rng) for _ in range(200)]
        assert all(nominal * 0.5 <= w <= nominal for w in waits), attempt
        assert max(waits) - min(waits) > 0.3 * nominal * 0.5  # jitter really spreads the waits


def test_backoff_without_jitter_is_exact_and_seeded_jitter_is_reproducible():
    p = RetryPolicy(backoff_base_s=0.1, backoff_max_s=10.0, jitter=0.0)
    assert [p.backoff(k, random.Random()) for k in range(4)] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    q = RetryPolicy(seed=7)
    a = [q.delay(k, None, random.Random(7)) for k in range(5)]
    b = [q.delay(k, None, random.Random(7)) for k in range(5)]
    assert a == b


def test_retry_after_wins_over_backoff_and_is_capped():
    p = RetryPolicy(backoff_base_s=0.01, jitter=0.0, max_retry_after_s=5.0)
    assert p.delay(0, 2.0, random.Random(0)) == 2.0
    assert p.delay(3, 100.0, random.Random(0)) == 5.0
    j = RetryPolicy(backoff_base_s=0.2, jitter=1.0)
    assert 1.0 <= j.delay(0, 1.0, random.Random(1)) <= 1.2


@pytest.mark.parametrize("status", [400, 401, 404, 413, 422])
def test_policy_refuses_to_retry_client_errors(status):
    with pytest.raises(ValueError, match="never retried"):
        RetryPolicy(retry_statuses=frozenset({429, status}))


def test_policy_rejects_bad_values():
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=1.5)


def test_parse_retry_after_seconds_fraction_date_and_garbage():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.25 ") == 0.25
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(30.0, abs=1.0)


@pytest.mark.parametrize("status,cls", [
    (400, ValidationError), (401, AuthError), (403, AuthError), (404, NotFoundError), (413, PayloadTooLargeError),
    (422, ValidationError), (429, RateLimitedError), (503, UnavailableError), (504, GatewayTimeoutError),
    (500, ServerError), (502, ServerError), (418, QuickstepError)])
def test_status_maps_to_exception(status, cls):
    assert error_class(status) is cls
    assert issubclass(cls, QuickstepError)


def test_error_body_contract_fastapi_and_text():
    body = b'{"error": {"code": "queue_full", "message": "retry after 1 s"}}'
    assert parse_error_body(429, body, "application/json") == ("queue_full", "retry after 1 s")
    assert parse_error_body(422, b'{"detail": "bad"}', "application/json") == ("invalid_request", "bad")
    assert parse_error_body(502, b"Bad Gateway\nnginx", "text/html") == ("http_502", "Bad Gateway")
    assert parse_error_body(503, b"", "text/plain")[1] == "HTTP 503 with an empty body"
    assert issubclass(GatewayTimeoutError, TimeoutError)
    e = RateLimitedError("full", status=429, code="queue_full", retry_after=2.0)
    assert (e.status, e.code, e.message, e.retry_after) == (429, "queue_full", "full", 2.0)
    assert str(e) == "HTTP 429 queue_full: full"


def test_client_imports_only_the_shared_schemas_of_the_project():
    import subprocess
    import sys

    code = ("import sys, quickstep.client, quickstep.client.cli, quickstep.client.bench; "
            "print(sorted(m for m in sys.modules if m.startswith(('quickstep.', 'torch', 'matplotlib', 'fastapi'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    mods = eval(out)  # noqa: S307 - our own printed list
    assert [m for m in mods if not m.startswith("quickstep.client")] == ["quickstep.serve", "quickstep.serve.schemas"]
