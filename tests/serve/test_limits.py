"""503 before ready, 429 from a flooded queue of size 1, 504 from a 1 ms deadline, 401 API keys (real uvicorn)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import hold_worker, serve, wait_queued

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(bundle_dir):
    """max_queue=1, warm-up delayed 1.5 s, API key required; yielded before it is ready."""
    with serve(wait_ready=False, bundle=[bundle_dir], max_queue=1, max_batch=1, max_wait_ms=0,
               warmup_delay_s=1.5, api_keys=[KEY]) as s:
        yield s


def test_503_before_ready_then_200(server):
    r = httpx.get(server.url + "/health/ready")
    assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"]
    r = httpx.post(server.url + "/v1/generate", json={"seed": 1}, headers=AUTH)
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    assert httpx.get(server.url + "/v2/health/ready").status_code == 503
    assert httpx.get(server.url + "/health/live").status_code == 200
    server.wait_ready(30)
    assert httpx.post(server.url + "/v1/generate", json={"seed": 1}, headers=AUTH).status_code == 200


def test_401_api_key(server):
    server.wait_ready(30)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url + "/v1/generate", json={}, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "unauthorized" and KEY not in r.text
    for path in ("/v1/models", "/metrics", "/docs"):
        assert httpx.get(server.url + path).status_code == 401, path
    assert httpx.post(server.url + "/v1/generate", json={}, headers={"X-API-Key": KEY}).status_code == 200
    assert httpx.get(server.url + "/v1/models", headers=AUTH).status_code == 200
    for path in ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"):
        assert httpx.get(server.url + path).status_code == 200, path


def test_429_queue_full(server):
    server.wait_ready(30)
    gate = hold_worker(server)
    try:
        with ThreadPoolExecutor(12) as ex:
            futs = [ex.submit(httpx.post, server.url + "/v1/generate", json={"seed": i}, headers=AUTH, timeout=30)
                    for i in range(12)]
            wait_queued(server, 1)
            deadline = time.monotonic() + 30
            while sum(f.done() for f in futs) < 10 and time.monotonic() < deadline:
                time.sleep(0.01)
            rejected = [f.result().status_code for f in futs if f.done()]  # answered while the worker is held
            gate.set()
            rs = [f.result() for f in futs]
    finally:
        gate.set()
    codes = [r.status_code for r in rs]
    assert codes.count(200) == 2 and codes.count(429) == 10, codes  # one running + one queued; the rest rejected
    assert rejected == [429] * 10
    r429 = next(r for r in rs if r.status_code == 429)
    assert int(r429.headers["retry-after"]) >= 1 and r429.json()["error"]["code"] == "queue_full"


def test_504_deadline(server):
    """A 1 ms deadline (X-Timeout-Ms: 1) on a request that cannot run (the worker is held, so no machine is fast
    enough to beat it): 504 soon after, while the worker is still held, not at release."""
    server.wait_ready(30)
    before = _dropped(server, "deadline")
    gate = hold_worker(server)
    try:
        t0 = time.perf_counter()
        r = httpx.post(server.url + "/v1/generate", json={"n": 16, "steps": 2},
                       headers={**AUTH, "X-Timeout-Ms": "1"}, timeout=30)
        took = time.perf_counter() - t0
        held = not gate.is_set()
    finally:
        gate.set()
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    assert held and 0.001 <= took < 5
    assert _dropped(server, "deadline") == before + 1
    # the server still answers normally afterwards
    assert httpx.post(server.url + "/v1/generate", json={}, headers=AUTH).status_code == 200


def _dropped(server, reason: str) -> float:
    from .test_http import metric_samples

    return sum(x.value for x in metric_samples(server, headers=AUTH).get("quickstep_requests_dropped_total", [])
               if x.labels["reason"] == reason)


def test_disconnected_client_is_dropped_before_running(bundle_dir):
    """A request whose client closed its connection while queued never reaches the backend."""
    import socket

    from .test_http import metric_samples

    with serve(bundle=[bundle_dir], max_batch=1, max_wait_ms=0, max_queue=64) as s:
        gate = hold_worker(s)
        with ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(httpx.post, s.url + "/v1/generate", json={"seed": i}, timeout=60) for i in range(4)]
            wait_queued(s, 3)  # the 4th is taken by the collector and waits for the worker
            body = b'{"seed": 99}'
            with socket.create_connection(("127.0.0.1", s.port)) as sock:
                sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                wait_queued(s, 4)
            time.sleep(0.1)  # the server sees the connection close
            gate.set()
            assert all(f.result().status_code == 200 for f in futs)
        samples = metric_samples(s)
        dropped = [x for x in samples.get("quickstep_requests_dropped_total", [])
                   if x.labels["reason"] == "client_disconnected"]
        runs = sum(x.value for x in samples["quickstep_backend_runs_total"])
    assert dropped and dropped[0].value == 1
    assert runs == 4


def test_graceful_shutdown_finishes_in_flight_work(bundle_dir):
    """Requests queued when shutdown starts are still answered 200; new connections are refused afterwards."""
    with serve(bundle=[bundle_dir], max_batch=1, max_wait_ms=0, max_queue=64) as s:
        gate = hold_worker(s)
        with ThreadPoolExecutor(6) as ex:
            futs = [ex.submit(httpx.post, s.url + "/v1/generate", json={"n": 4, "seed": i}, timeout=60)
                    for i in range(5)]
            wait_queued(s, 5)  # all five read by the server (a chunked job stays queued until its last chunk runs)
            stopper = ex.submit(s.stop)
            time.sleep(0.3)  # shutdown has begun: the listening socket is closed
            assert not any(f.done() for f in futs)
            gate.set()
            codes = [f.result().status_code for f in futs]
            stopper.result()
    assert codes == [200] * 5
    with pytest.raises(httpx.TransportError):
        httpx.get(s.url + "/health/live", timeout=2)


def test_429_and_504_alike_on_the_openai_and_v2_routes(server):
    """Same queue and deadlines behind every API: with the queue full both routes answer 429 (+ Retry-After) in
    their own error shape; with a 1 ms deadline (X-Timeout-Ms, or v2's parameters.timeout in us) they answer 504."""
    server.wait_ready(30)
    openai_url, v2_url = server.url + "/v1/images/generations", server.url + "/v2/models/tiny-consistency/infer"
    v2_body = {"inputs": [{"name": "seed", "shape": [1], "datatype": "INT64", "data": [1]}]}
    gate = hold_worker(server)
    try:
        with ThreadPoolExecutor(2) as ex:
            first = ex.submit(httpx.post, server.url + "/v1/generate", json={"seed": 1}, headers=AUTH, timeout=30)
            batcher = server.app.state.service.models["tiny-consistency"].batcher
            deadline = time.monotonic() + 30
            while not (batcher._outstanding == 1 and batcher.depth == 0):  # taken, waiting on the held worker
                assert time.monotonic() < deadline, "the first request was not dispatched"
                time.sleep(0.005)
            second = ex.submit(httpx.post, server.url + "/v1/generate", json={"seed": 2}, headers=AUTH, timeout=30)
            wait_queued(server, 1)  # the one queue slot is taken
            r_oa = httpx.post(openai_url, json={"prompt": ""}, headers=AUTH, timeout=30)
            r_v2 = httpx.post(v2_url, json=v2_body, headers=AUTH, timeout=30)
            gate.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
    finally:
        gate.set()
    assert r_oa.status_code == 429 and r_oa.headers["retry-after"], r_oa.text
    assert r_oa.json()["error"]["type"] == "rate_limit_error" and r_oa.json()["error"]["code"] == "queue_full"
    assert r_v2.status_code == 429 and r_v2.headers["retry-after"] and "queue" in r_v2.json()["error"], r_v2.text
    gate = hold_worker(server)
    try:
        r_oa = httpx.post(openai_url, json={"prompt": ""}, headers={**AUTH, "X-Timeout-Ms": "1"}, timeout=30)
        r_v2 = httpx.post(v2_url, json={**v2_body, "parameters": {"timeout": 1000}}, headers=AUTH, timeout=30)
    finally:
        gate.set()
    assert r_oa.status_code == 504 and r_oa.json()["error"]["code"] == "deadline_exceeded", r_oa.text
    assert r_v2.status_code == 504 and "deadline" in r_v2.json()["error"], r_v2.text
