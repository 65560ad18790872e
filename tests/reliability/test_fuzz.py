"""Hostile input (issue 12, part 2): schemathesis against the server's own /openapi.json over real HTTP, and a
table of hand-written bad requests, each answered with the right 4xx and a JSON error naming the problem.

The >= 1000-case run is tests/benchmarks/fuzz.py (same `run_fuzz`, more cases)."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace

import httpx
import pytest

from tests.benchmarks.fuzz import (
    MIN_DEADLINE_MS,
    no_server_error,
    print_report,
    raise_short_deadlines,
    run_fuzz,
)
from tests.serve.conftest import serve

KEY = "fuzz-key-3c1f"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}
MODEL = "tiny-consistency"


@pytest.fixture(scope="module")
def server(rel_bundle):
    with serve(bundle=[rel_bundle], api_keys=[KEY], max_images_per_request=16, max_body_bytes=1_048_576) as s:
        yield s


def test_schemathesis_finds_no_failure(server):
    """~100 generated cases (positive and negative), one at a time, to a ready server with the default queue:
    no 5xx of any kind and no 429 (fuzz.py's checks), every status code,
    content type, header and body as the OpenAPI document says, schema-violating input rejected with a 4xx."""
    report = run_fuzz(server.url, 100, headers=AUTH)
    print_report(report)
    assert report.cases >= 100
    assert report.per_operation["POST /v1/generate [negative]"] > 10
    assert report.failures == [], json.dumps(report.failures, indent=1)
    assert report.server_errors == 0 and "429" not in report.statuses, report.statuses


@pytest.mark.parametrize("status,code", [(500, "internal"), (503, "backend_failure"), (503, "not_ready"),
                                         (503, "shutting_down"), (504, "deadline_exceeded"), (502, None)])
def test_fuzz_check_accepts_no_server_error(status, code):
    """The fuzzer's 5xx check has no allow-list: a fuzzed input that crashes the backend cannot pass."""
    body = json.dumps({"error": {"code": code, "message": "x"}}).encode() if code else b"bad gateway"
    with pytest.raises(AssertionError, match=f"server error {status}"):
        no_server_error(None, SimpleNamespace(status_code=status, content=body), None)
    no_server_error(None, SimpleNamespace(status_code=422, content=b"{}"), None)


def test_fuzz_raises_only_short_valid_deadlines():
    """A valid X-Timeout-Ms that could expire is raised (no legitimate 504); invalid ones are still sent as fuzzed."""
    for given, sent in [("1", str(MIN_DEADLINE_MS)), ("0.5", str(MIN_DEADLINE_MS)), ("1e12", "1e12"),
                        ("0", "0"), ("-5", "-5"), ("soon", "soon"), ("nan", "nan"), ("1_0", "1_0")]:
        case = SimpleNamespace(headers={"x-timeout-ms": given, "Accept": "application/json"})
        raise_short_deadlines(case)
        assert case.headers == {"x-timeout-ms": sent, "Accept": "application/json"}, given


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes (for what httpx refuses to send), read the whole answer (Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def post_json(server, body, headers=None) -> httpx.Response:
    return httpx.post(server.url + "/v1/generate", json=body, headers={**AUTH, **(headers or {})}, timeout=30)


def post_raw(server, content: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(server.url + "/v1/generate", content=content, headers={**AUTH, **headers}, timeout=30)


def chunked_10mb():
    yield b'{"model": "'
    for _ in range(1000):
        yield b"z" * 10_000
    yield b'"}'


# (id, request(server) -> response, status, words the message must contain (case-insensitive))
CASES = [
    ("n-string", lambda s: post_json(s, {"n": "three"}), 422, ["n", "integer", "1 to 16"]),
    ("n-float", lambda s: post_json(s, {"n": 1.5}), 422, ["n", "integer"]),
    ("n-bool", lambda s: post_json(s, {"n": True}), 422, ["n", "integer"]),
    ("n-list", lambda s: post_json(s, {"n": [1]}), 422, ["n", "integer"]),
    ("n-huge", lambda s: post_json(s, {"n": 10**9}), 422, ["n", "16"]),
    ("n-zero", lambda s: post_json(s, {"n": 0}), 422, ["n", "1 to 16"]),
    ("steps-0", lambda s: post_json(s, {"steps": 0}), 422, ["steps", "steps_supported"]),
    ("steps-3", lambda s: post_json(s, {"steps": 3}), 422, ["steps", "[1, 2]"]),
    ("steps-string", lambda s: post_json(s, {"steps": "2"}), 422, ["steps", "integer"]),
    ("seed-negative", lambda s: post_json(s, {"seed": -1}), 422, ["seed", "0 to 9223372036854775807"]),
    ("seed-2**64", lambda s: post_json(s, {"seed": 2**64}), 422, ["seed", "9223372036854775807"]),
    ("class-label-unconditional", lambda s: post_json(s, {"class_label": 3}), 422, ["class_label", "unconditional"]),
    ("format-gif", lambda s: post_json(s, {"format": "gif"}), 422, ["format", "png", "jpeg", "webp"]),
    ("scale-0", lambda s: post_json(s, {"scale": 0}), 422, ["scale", "1 to 16"]),
    ("unknown-model", lambda s: post_json(s, {"model": "nope"}), 404, ["nope", MODEL]),
    ("unknown-field", lambda s: post_json(s, {"prompt": "a cat"}), 422, ["prompt", "unknown field", "seed"]),
    ("malformed-json", lambda s: post_raw(s, b'{"n": 1,', JSON), 422, ["body", "json"]),
    ("invalid-utf8", lambda s: post_raw(s, b'\xac\xcf{"n": 1}', JSON), 422, ["body", "json"]),
    ("deeply-nested", lambda s: post_raw(s, b'{"n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON), 422,
     ["body", "json"]),
    ("nan", lambda s: post_raw(s, b'{"n": NaN}', JSON), 422, ["n"]),
    ("array-body", lambda s: post_json(s, [1, 2]), 422, ["body"]),
    ("empty-body", lambda s: post_raw(s, b"", JSON), 422, ["body", "json object"]),
    ("text-plain", lambda s: post_raw(s, b'{"n": 1}', {"Content-Type": "text/plain"}), 422,
     ["content-type", "application/json"]),
    ("form-encoded", lambda s: post_raw(s, b"n=1", {"Content-Type": "application/x-www-form-urlencoded"}), 422,
     ["content-type", "application/json"]),
    ("10MB-body", lambda s: post_raw(s, b'{"model": "' + b"x" * 10_000_000 + b'"}', JSON), 413, ["1048576 bytes"]),
    ("10MB-chunked", lambda s: post_raw(s, chunked_10mb(), JSON), 413, ["1048576 bytes"]),
    ("huge-header", lambda s: post_json(s, {}, {"X-Big": "h" * 100_000}), 431, ["headers", "65536"]),
    ("timeout-header-junk", lambda s: post_json(s, {}, {"X-Timeout-Ms": "soon"}), 422, ["x-timeout-ms", "number"]),
    ("timeout-header-negative", lambda s: post_json(s, {}, {"X-Timeout-Ms": "-5"}), 422, ["x-timeout-ms"]),
    ("accept-gif", lambda s: post_json(s, {}, {"Accept": "image/gif"}), 406, ["accept", "image/png", "application/json"]),
    ("accept-html", lambda s: post_json(s, {}, {"Accept": "text/html"}), 406, ["accept", "application/json"]),
    ("raw-image-n2", lambda s: post_json(s, {"n": 2}, {"Accept": "image/png"}), 422, ["n", "one image"]),
    ("no-api-key", lambda s: httpx.post(s.url + "/v1/generate", json={}), 401, ["api key", "bearer"]),
    ("wrong-api-key", lambda s: httpx.post(s.url + "/v1/generate", json={}, headers={"X-API-Key": "guess"}), 401,
     ["api key"]),
    ("basic-auth", lambda s: httpx.post(s.url + "/v1/generate", json={}, auth=("user", KEY)), 401, ["api key"]),
    ("put-method", lambda s: httpx.put(s.url + "/v1/generate", json={}, headers=AUTH), 405, ["method"]),
    ("unknown-route", lambda s: httpx.get(s.url + "/v1/generate/../../etc/passwd", headers=AUTH), 404, ["no route"]),
    ("model-path-unknown", lambda s: httpx.get(s.url + "/v1/models/%2e%2e", headers=AUTH), 404, [MODEL]),
]


@pytest.mark.parametrize("request_fn,status,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_table(server, request_fn, status, words):
    r = request_fn(server)
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    msg = body["error"]["message"].lower()
    assert all(w.lower() in msg for w in words), (words, body["error"]["message"])
    assert KEY not in r.text


def test_table_is_big_enough():
    assert len(CASES) >= 20


def test_http_layer_rejections_do_not_reach_the_app(server):
    """What is not HTTP at all (a control character in a header, a non-numeric Content-Length) is refused by the
    HTTP parser with a 400 before any app code runs; the server keeps serving."""
    for raw in (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nX-Junk: a\x01b\r\nContent-Length: 2\r\n\r\n{}",
                b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n{}"):
        status, _, _ = raw_request(server.port, raw)
        assert status == 400
    assert post_json(server, {"seed": 1}).status_code == 200


def test_junk_but_legal_headers_are_ignored(server):
    """Unknown, long, repeated or odd-but-legal headers change nothing: 200 and the same image for the same seed."""
    ref = post_json(server, {"seed": 5}).json()["images"][0]["b64"]
    junk = [("X-Junk", b"\xc3\xa9\xff"), ("X-Long", "y" * 6000), ("Accept-Encoding", "br;q=x"),
            ("X-Forwarded-For", "not-an-ip"), ("Cookie", "a=" + "b" * 1000), ("Accept", "*/*"),
            ("Accept", "application/json;q=0.5, image/gif")]
    for k, v in junk:
        r = post_json(server, {"seed": 5}, {k: v})
        assert r.status_code == 200, (k, r.text)
        assert r.json()["images"][0]["b64"] == ref
