"""HTTP contract against a real uvicorn on 127.0.0.1 serving a tiny class-conditional bundle (+ the Gradio UI)."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from .conftest import hold_worker, serve, wait_queued


@pytest.fixture(scope="module")
def server(cond_bundle_dir, bundle_dir):
    with serve(bundle=[cond_bundle_dir, bundle_dir], ui=True, max_batch=32, max_wait_ms=20, max_body_bytes=4096) as s:
        yield s


def post(server, body, **kw) -> httpx.Response:
    return httpx.post(server.url + "/v1/generate", json=body, timeout=30, **kw)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def metric_samples(server, headers: dict[str, str] | None = None) -> dict[str, list]:
    r = httpx.get(server.url + "/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    text = r.text
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def backend_runs(server) -> float:
    return sum(s.value for s in metric_samples(server).get("quickstep_backend_runs_total", []))


def test_generate_json_images(server):
    r = post(server, {"n": 3, "seed": 11, "scale": 2, "class_label": 4})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["seed"] == 11 and body["steps"] == 1 and body["model"] == "tiny-consistency-cond"
    assert [im["index"] for im in body["images"]] == [0, 1, 2]
    for im in body["images"]:
        assert im["mime"] == "image/png" and im["class_label"] == 4
        img = decode(im["b64"])
        assert img.format == "PNG" and img.size == (16, 16) and img.mode == "L"
    assert body["latency_ms"] > 0


@pytest.mark.parametrize("fmt,pil", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_generate_formats(server, fmt, pil):
    r = post(server, {"seed": 1, "format": fmt, "steps": 2})
    assert r.status_code == 200
    im = r.json()["images"][0]
    assert im["mime"] == f"image/{fmt}" and decode(im["b64"]).format == pil and decode(im["b64"]).size == (8, 8)


def test_raw_png_and_random_seed(server):
    r = post(server, {"scale": 4}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (32, 32)
    seed = int(r.headers["x-seed"])  # drawn by the server, echoed
    again = post(server, {"scale": 4, "seed": seed, "class_label": int(r.headers["x-class-label"])},
                 headers={"Accept": "image/png"})
    assert again.content == r.content


def test_second_model_unconditional(server):
    r = post(server, {"model": "tiny-consistency", "n": 2, "steps": 2, "seed": 3})
    assert r.status_code == 200 and r.json()["model"] == "tiny-consistency"
    assert all(im["class_label"] is None for im in r.json()["images"])
    r = post(server, {"model": "tiny-consistency", "class_label": 1})
    assert r.status_code == 422 and "unconditional" in r.json()["error"]["message"]


def test_raw_image_needs_n1(server):
    r = post(server, {"n": 2}, headers={"Accept": "image/png"})
    assert r.status_code == 422 and "n" in r.json()["error"]["message"]


def test_same_bytes_alone_and_batched(server):
    """Image k of seed s depends only on (s, k): alone == with 15 concurrent others (different seeds/steps/labels)."""
    req = {"n": 2, "seed": 1234, "class_label": 3}
    alone = post(server, req).json()["images"]
    others = [{"n": 1 + i % 3, "seed": i, "steps": 1 + i % 2} for i in range(15)]
    gate = hold_worker(server)  # everything queues up, then runs in merged batches
    try:
        with ThreadPoolExecutor(16) as ex:
            futs = [ex.submit(post, server, b) for b in others[:8]] + [ex.submit(post, server, req)]
            futs += [ex.submit(post, server, b) for b in others[8:]]
            wait_queued(server, 16, counting="outstanding")  # all 16 reached the server before any batch runs
            gate.set()
            results = [f.result() for f in futs]
    finally:
        gate.set()
    assert all(r.status_code == 200 for r in results)
    assert [im["b64"] for im in results[8].json()["images"]] == [im["b64"] for im in alone]


def _batch_histogram(server, model: str) -> tuple[float, float, float]:
    """(count, sum, count in the le=1 bucket) of the batch-size histogram of `model`."""
    s = metric_samples(server)

    def one(name: str, **labels: str) -> float:
        return sum(x.value for x in s.get(name, []) if x.labels.get("model") == model
                   and all(x.labels.get(k) == v for k, v in labels.items()))

    return (one("quickstep_batch_size_images_count"), one("quickstep_batch_size_images_sum"),
            one("quickstep_batch_size_images_bucket", le="1.0"))


def test_batching_reduces_backend_runs(server):
    model = server.app.state.service.default_model
    before = backend_runs(server)
    count0, sum0, ones0 = _batch_histogram(server, model)
    n_req = 16
    gate = hold_worker(server)
    try:
        with ThreadPoolExecutor(n_req) as ex:
            futs = [ex.submit(post, server, {"seed": i, "class_label": i % 10}) for i in range(n_req)]
            wait_queued(server, n_req // 2)
            gate.set()
            rs = [f.result() for f in futs]
    finally:
        gate.set()
    assert all(r.status_code == 200 for r in rs)
    runs = backend_runs(server) - before
    assert 1 <= runs < n_req, f"{runs} backend runs for {n_req} concurrent requests: no batching"
    count1, sum1, ones1 = _batch_histogram(server, model)
    assert count1 - count0 == runs  # one observation per backend run ...
    assert sum1 - sum0 == n_req  # ... adding up to every image requested
    assert ones1 - ones0 < runs  # at least one run merged several requests (a batch of more than 1 image)
    assert (sum1 - sum0) / (count1 - count0) > 1


@pytest.mark.parametrize("body,field", [
    ({"n": 17}, "n"),
    ({"n": 0}, "n"),
    ({"steps": 3}, "steps"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"n": "two"}, "n"),
    ({"steps": 1.5}, "steps"),
    ({"seed": [1]}, "seed"),
    ({"format": "gif"}, "format"),
    ({"scale": 100}, "scale"),
    ({"class_label": 10}, "class_label"),
    ({"class_label": -1}, "class_label"),
    ({"colour": "red"}, "colour"),
    ([1, 2], "body"),
    (None, "body"),
])
def test_422_names_field(server, body, field):
    r = post(server, body)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_request" and err["message"].startswith(field), err


def test_422_messages_name_allowed_values(server):
    assert "[1, 2]" in post(server, {"steps": 3}).json()["error"]["message"]
    assert "16" in post(server, {"n": 17}).json()["error"]["message"]
    assert "0 and 9" in post(server, {"class_label": 10}).json()["error"]["message"]


def test_malformed_bodies_are_4xx_json(server):
    for content, ctype in [(b"{bad json", "application/json"), (b"\xff\xfe", "application/json"),
                           (b"n=1", "application/x-www-form-urlencoded"), (b"", "application/json")]:
        r = httpx.post(server.url + "/v1/generate", content=content, headers={"Content-Type": ctype}, timeout=10)
        assert r.status_code == 422, (content, r.text)
        assert set(r.json()["error"]) == {"code", "message"}
    r = httpx.post(server.url + "/v1/generate", json={}, headers={"X-Timeout-Ms": "soon"}, timeout=10)
    assert r.status_code == 422 and "x-timeout-ms" in r.json()["error"]["message"].lower()


def test_404_json(server):
    r = post(server, {"model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "tiny-consistency-cond" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.get(server.url + "/no/such/route")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.delete(server.url + "/v1/generate")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_413_json(server):
    big = {"model": "x" * 5000}
    r = post(server, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunks():  # no Content-Length: the limit still applies
        yield b'{"model": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = httpx.post(server.url + "/v1/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_models_health_docs(server):
    models = httpx.get(server.url + "/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["tiny-consistency-cond", "tiny-consistency"]
    assert models[1]["num_classes"] == 0 and models[1]["class_names"] is None
    m = models[0]
    assert m["image_shape"] == [1, 8, 8] and m["num_classes"] == 10 and m["steps_supported"] == [1, 2]
    assert m["ready"] and m["backend"].startswith("onnxruntime")
    assert m["device"] == {"backend": "onnxruntime", "kind": "cpu", "provider": "CPUExecutionProvider"}
    one = httpx.get(server.url + "/v1/models/tiny-consistency-cond").json()
    assert one["name"] == m["name"] and "quality" in one
    for path in ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready",
                 "/v2/models/tiny-consistency-cond/ready"):
        assert httpx.get(server.url + path).status_code == 200, path
    assert httpx.get(server.url + "/docs").status_code == 200
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/generate" in spec["paths"]


def test_metrics_parse(server):
    post(server, {"seed": 5})
    s = metric_samples(server)
    names = set(s)
    for name in ("quickstep_requests_total", "quickstep_queue_latency_seconds_bucket",
                 "quickstep_compute_latency_seconds_bucket", "quickstep_request_latency_seconds_bucket",
                 "quickstep_batch_size_images_bucket", "quickstep_queue_depth", "quickstep_backend_runs_total"):
        assert name in names, name
    ok = [x for x in s["quickstep_requests_total"]
          if x.labels["route"] == "/v1/generate" and x.labels["status"] == "200"]
    assert ok and ok[0].value >= 1
    assert [x.value for x in s["quickstep_requests_in_progress"]] == [1.0]  # only this /metrics request
    bad = [x for x in s["quickstep_requests_total"] if x.labels["status"] == "422"]
    assert bad


def test_gradio_ui(server):
    from gradio_client import Client

    assert httpx.get(server.url + "/ui/").status_code == 200
    client = Client(server.url + "/ui/", verbose=False)
    gallery, seed, latency = client.predict("tiny-consistency-cond", "2", 7, False, "3", 2, api_name="/generate")
    assert seed == 7 and "ms" in latency and len(gallery) == 2
    img = Image.open(gallery[0]["image"]["path"] if isinstance(gallery[0]["image"], dict) else gallery[0]["image"])
    assert img.size == (128, 128)
    # the UI runs the same service: its pixels equal the API's for the same request (upscaled 16x)
    api = post(server, {"seed": 7, "steps": 2, "class_label": 3, "n": 2}).json()["images"][0]["b64"]
    small = np.asarray(decode(api))
    assert np.array_equal(np.asarray(img.convert("L"))[::16, ::16], small)


WEIRD = [None, True, -1, 0, 2**70, 1.0, 1.5, float("inf"), "", "1", "png", [], [1], {}, {"a": 1}, "x" * 300]


def test_no_client_input_yields_500(server):
    """Every field x a set of hostile values, plus odd headers: only 200 or a 4xx JSON error, never 5xx."""
    fields = ["model", "n", "steps", "seed", "class_label", "format", "scale"]
    bodies = [{f: v} for f in fields for v in WEIRD]
    headers = [{"Accept": "image/webp"}, {"Accept": "image/*"}, {"Accept": "text/html"},
               {"X-Timeout-Ms": "-5"}, {"X-Timeout-Ms": "1e12"}, {"X-Timeout-Ms": "nan"},
               {"Content-Type": "text/plain"}]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        results = [(b, {}, c.post("/v1/generate", content=_json(b), headers={"Content-Type": "application/json"}))
                   for b in bodies]
        results += [({"seed": 1}, h, c.post("/v1/generate", content=b'{"seed": 1}',
                                            headers={"Content-Type": "application/json", **h})) for h in headers]
        results += [(None, {}, c.get(p)) for p in ("/v1/models/%00", "/v1/models/" + "a" * 1000, "/v1/generate")]
    for body, h, r in results:
        assert r.status_code < 500, (body, h, r.status_code, r.text)
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"code", "message"}, (body, r.text)
    webp = next(r for b, h, r in results if h.get("Accept") == "image/webp")
    assert webp.status_code == 200 and webp.headers["content-type"] == "image/webp"


def _json(body) -> bytes:
    import json

    return json.dumps(body, allow_nan=True).encode()
