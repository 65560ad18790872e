"""Security (issue 12, part 4): API keys guard every route but the health probes, keys are compared in constant
time and never logged, no load path unpickles, request sizes are limited, containers run as non-root."""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import pickle
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess
from tests.serve.conftest import serve

ROOT = Path(__file__).resolve().parents[2]
KEY = "qs-live-7f3a9c2e5b1d"
WRONG = "qs-wrong-0d1e2f3a4b5c"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny-consistency"
HEALTH = {"/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"}


# ----------------------------------------------------------------------------------------------- API keys
def all_routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, including those left out of the OpenAPI document and the
    routes of included routers and mounts (path parameters filled with the model name)."""
    out: set[tuple[str, str]] = set()

    def walk(routes, prefix: str = "") -> None:
        for r in routes:
            inner = getattr(r, "original_router", None)
            if inner is not None:
                walk(inner.routes, prefix)
                continue
            path = prefix + getattr(r, "path", "")
            methods = getattr(r, "methods", None)
            if methods is None:  # a Mount (e.g. the Gradio UI): its root and anything below
                out.update({("GET", path or "/"), ("GET", path + "/"), ("GET", path + "/config")})
                continue
            path = re.sub(r"\{[^}]+\}", MODEL, path)
            out.update((m, path) for m in methods if m != "HEAD")

    walk(app.routes)
    for path, ops in app.openapi()["paths"].items():
        out.update((m.upper(), re.sub(r"\{[^}]+\}", MODEL, path)) for m in ops)
    return sorted(out)


@pytest.fixture(scope="module")
def keyed(rel_bundle):
    with serve(bundle=[rel_bundle], api_keys=[KEY], ui=True) as s:
        yield s


def call(s, method: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"seed": 1} if method == "POST" else None
    return httpx.request(method, s.url + path, json=body, headers=headers, timeout=30)


def test_every_route_but_health_probes_needs_the_key(keyed):
    from quickstep.serve.errors import api_of

    routes = all_routes(keyed.app)
    paths = {p for _, p in routes}
    assert {"/v1/generate", "/v1/models", "/metrics", "/docs", "/openapi.json", "/ui"} <= paths, paths
    assert HEALTH <= paths
    open_routes, wrongly_closed = [], []
    for method, path in routes:
        r = call(keyed, method, path)
        if path in HEALTH:
            if r.status_code == 401:
                wrongly_closed.append((method, path))
        elif r.status_code != 401:
            open_routes.append((method, path, r.status_code))
        else:
            assert r.headers["www-authenticate"] == "Bearer"
            err = r.json()["error"]  # each API's own error shape: v2's is a string
            assert ("API key" in err) if api_of(path) == "v2" else (err["code"] == "unauthorized"), (path, err)
        for bad in ({"Authorization": f"Bearer {WRONG}"}, {"X-API-Key": KEY[:-1]}, {"X-API-Key": KEY + "x"},
                    {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}, {"X-API-Key": KEY.upper()}):
            if path not in HEALTH:
                assert call(keyed, method, path, bad).status_code == 401, (method, path, bad)
    assert open_routes == [] and wrongly_closed == []
    # and with the key every one of them is reachable
    for method, path in routes:
        for good in (AUTH, {"X-API-Key": KEY}, {"authorization": f"bearer {KEY}"}):
            assert call(keyed, method, path, good).status_code != 401, (method, path, good)


def _authorized_source() -> str:
    from quickstep.serve import middleware

    return inspect.getsource(middleware.AuthMiddleware)


def test_key_comparison_is_constant_time():
    """The gateway compares keys only through hmac/secrets.compare_digest, against every key (no early exit, no
    `==`, no `in`, no dict/set lookup of the given key)."""
    src = _authorized_source()
    tree = ast.parse(src.lstrip())
    cls = tree.body[0]
    method = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "_authorized")
    calls = {ast.unparse(n.func) for n in ast.walk(method) if isinstance(n, ast.Call)}
    assert calls & {"hmac.compare_digest", "secrets.compare_digest", "compare_digest"}, calls
    for node in ast.walk(method):
        if isinstance(node, ast.Compare):  # no ==, !=, in, is on anything holding a key (names, not strings)
            idents = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            idents |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            assert not any("key" in i.lower() for i in idents), f"non-constant-time comparison: {ast.unparse(node)}"
        assert not isinstance(node, ast.Return | ast.Break) or ast.unparse(node) in ("return ok",), ast.unparse(node)
    # no other part of the HTTP side compares API keys with ==, !=, in (bundle.py's manifest keys are not secrets)
    for f in [ROOT / "serve" / n for n in ("app.py", "middleware.py", "deps.py", "settings.py", "cli.py", "ui.py")] + \
            sorted((ROOT / "serve" / "routes").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(o, ast.Eq | ast.NotEq | ast.In | ast.NotIn)
                                                     for o in node.ops):
                idents = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                idents |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
                assert not any("key" in i.lower() for i in idents), f"{f}:{node.lineno}: {ast.unparse(node)}"


def test_keys_never_logged(rel_bundle, tmp_path):
    """Debug logging, right and wrong keys in both headers, errors after auth: neither key reaches the log."""
    key_file = tmp_path / "keys.txt"
    file_key = "qs-file-a1b2c3d4e5f6"
    key_file.write_text(f"# keys\n{file_key}\n")
    with ServerProcess([rel_bundle], ["--log-level", "debug", "--api-key-file", str(key_file)],
                       env={"QUICKSTEP_API_KEYS": KEY}, log_path=tmp_path / "server.log") as srv:
        srv.wait_ready()
        u = srv.url
        for headers in (AUTH, {"X-API-Key": file_key}, {"Authorization": f"Bearer {WRONG}"}, {"X-API-Key": WRONG}):
            httpx.post(u + "/v1/generate", json={"seed": 1}, headers=headers, timeout=30)
            httpx.post(u + "/v1/generate", json={"steps": 9}, headers=headers, timeout=30)
            httpx.get(u + "/v1/models/nope", headers=headers, timeout=30)
            httpx.get(u + "/metrics", headers=headers, timeout=30)
        assert httpx.post(u + "/v1/generate", json={}, headers={"X-API-Key": file_key}).status_code == 200
        assert httpx.post(u + "/v1/generate", json={}, headers={"X-API-Key": WRONG}).status_code == 401
    log = srv.log()
    assert "POST /v1/generate" in log, "no access log captured: the test would prove nothing"
    for secret in (KEY, WRONG, file_key):
        assert secret not in log, f"{secret} appears in the server log"


def test_settings_never_show_keys():
    from quickstep.serve.settings import ServeSettings

    s = ServeSettings(api_keys=[KEY])
    assert KEY not in repr(s) and KEY not in str(s) and KEY not in s.model_dump_json()
    assert s.resolved_api_keys() == [KEY]


# ----------------------------------------------------------------------------------------------- pickle
class Payload:
    """Unpickling this runs code that creates `marker` (what an attacker's checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def evil_files(marker: Path, tmp: Path) -> dict[str, bytes]:
    """A raw pickle and a torch.save zip, both carrying the payload."""
    import torch

    torch.save({"step": Payload(marker), "optimizer": Payload(marker)}, tmp / "evil.pt")
    return {"pickle": pickle.dumps(Payload(marker)), "torch-zip": (tmp / "evil.pt").read_bytes()}


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "a malicious pickle was executed"


def test_payload_really_runs_when_unpickled(tmp_path):
    """The control: the same bytes, unpickled naively, do create the marker (so the tests below can fail)."""
    m = tmp_path / "PWNED"
    pickle.loads(evil_files(m, tmp_path)["pickle"])  # noqa: S301 - the point of the control
    assert m.read_text() == "pwned"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["pickle", "torch-zip"])
def test_checkpoint_loaders_never_unpickle(tmp_path, marker, kind):
    from quickstep.train.core.checkpoint import CheckpointError, load_model, load_state, load_weights

    from tests.helpers import tiny_checkpoint

    evil = evil_files(marker, tmp_path)[kind]
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    (ckpt / "model.safetensors").write_bytes(evil)
    for load in (load_weights, load_model):
        with pytest.raises(CheckpointError) as e:
            load(ckpt)
        assert "model.safetensors" in str(e.value)
    ckpt2 = tiny_checkpoint(tmp_path / "ckpt2")
    (ckpt2 / "state.pt").write_bytes(evil)
    load_model(ckpt2)  # the weights are fine
    with pytest.raises(CheckpointError) as e:
        load_state(ckpt2)
    assert "state.pt" in str(e.value)


def test_trainer_resume_never_unpickles(tmp_path, marker):
    """The trainer's --resume path (Trainer(resume=run)) on a run whose newest state.pt is malicious: a clear
    CheckpointError naming state.pt, no code run."""
    from quickstep.train.config import load_preset
    from quickstep.train.core.checkpoint import CheckpointError
    from quickstep.train.loop import Trainer, config_from_checkpoint

    out = tmp_path / "run"
    quiet = ["log.samples=false", "log.tensorboard=false", "log.progress=false"]
    cfg = load_preset("gmm2d-plain", [*quiet, "steps=1"])
    Trainer(cfg, out).fit()
    (out / "step-0000001" / "state.pt").write_bytes(evil_files(marker, tmp_path)["torch-zip"])
    with pytest.raises(CheckpointError, match="state.pt"):
        Trainer(config_from_checkpoint(out), out, resume=out)


def reseal(bundle: Path) -> None:
    """Rewrite the manifest's sha256/bytes so a tampered bundle passes verification (an attacker's own bundle)."""
    m = json.loads((bundle / "manifest.json").read_text())
    for rel, meta in m["files"].items():
        data = (bundle / rel).read_bytes()
        meta.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (bundle / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("backend,target", [("torch", "model.safetensors"), ("onnxruntime", "generator_1step.onnx")])
def test_bundle_loading_never_unpickles(bundle_copy, tmp_path, marker, backend, target):
    """A resealed bundle whose weights / graph file is a malicious pickle: the backend refuses to load it (the
    server never becomes ready) and the payload never runs."""
    (bundle_copy / target).write_bytes(evil_files(marker, tmp_path)["torch-zip"])
    reseal(bundle_copy)
    with serve(wait_ready=False, bundle=[bundle_copy], backend=backend) as s:
        deadline = time.monotonic() + 60
        while not s.app.state.service.loaded.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.get(s.url + "/health/ready")
    assert r.status_code == 503 and r.json()["models"] == {MODEL: False}


def test_export_never_unpickles(tmp_path, marker):
    from quickstep.export.bundle import export_bundle
    from quickstep.train.core.checkpoint import CheckpointError

    from tests.helpers import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    (ckpt / "model.safetensors").write_bytes(evil_files(marker, tmp_path)["torch-zip"])
    with pytest.raises((CheckpointError, ValueError)):
        export_bundle(ckpt, tmp_path / "bundle", steps=(1,))


def test_cifar10_reader_never_unpickles(tmp_path, marker):
    from quickstep.train.data import read_cifar_batch

    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": Payload(marker), b"labels": [0]}))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        read_cifar_batch(p)


def test_no_unsafe_deserialisation_in_the_source():
    """Every torch.load passes weights_only=True, np.load never allows pickles, no pickle.load(s) outside the
    restricted CIFAR-10 unpickler, no torch.jit.load / joblib / dill / cloudpickle / shelve / marshal."""
    problems = []
    for pkg in ("train", "export", "serve", "client"):
        for f in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(f.read_text())
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                name = ast.unparse(node.func)
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                where = f"{f.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)[:80]}"
                if name.endswith("torch.load") and kw.get("weights_only") != "True":
                    problems.append(where)
                if name.endswith("np.load") and kw.get("allow_pickle") != "False":
                    problems.append(where)
                if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "torch.jit.load", "joblib.load",
                            "dill.load", "cloudpickle.load", "shelve.open", "marshal.loads", "marshal.load"):
                    problems.append(where)
                if name.endswith(".load") and isinstance(node.func, ast.Attribute) and \
                        "Unpickler" in ast.unparse(node.func.value) and "_ArraysOnlyUnpickler" not in where:
                    problems.append(where)
    assert problems == [], problems


# ----------------------------------------------------------------------------------------------- sizes
def test_request_size_limits(keyed):
    """Bodies over the limit are refused before being read (413, with or without Content-Length); unauthenticated
    ones before that (401); header blocks over 64 KiB get 431 on every route; the server keeps serving."""
    big = b'{"model": "' + b"x" * 10_000_000 + b'"}'
    t0 = time.perf_counter()
    r = httpx.post(keyed.url + "/v1/generate", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 401
    r = httpx.post(keyed.url + "/v1/generate", content=big, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunks():
        for _ in range(1000):
            yield b"x" * 10_000

    r = httpx.post(keyed.url + "/v1/generate", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert time.perf_counter() - t0 < 30
    r = httpx.post(keyed.url + "/v1/generate", json={}, headers={"X-Big": "h" * 1_000_000, **AUTH}, timeout=30)
    assert r.status_code == 431 and r.json()["error"]["code"] == "request_header_fields_too_large"
    r = httpx.get(keyed.url + "/health/live", headers={"X-Big": "h" * 100_000})  # before anything else
    assert r.status_code == 431
    assert httpx.post(keyed.url + "/v1/generate", json={"seed": 1}, headers=AUTH).status_code == 200


# ----------------------------------------------------------------------------------------------- containers
def test_containers_run_as_non_root():
    files = sorted((ROOT / "docker").glob("Dockerfile*"))
    assert files, "no Dockerfiles"
    for f in files:
        lines = [ln.strip() for ln in f.read_text().splitlines()]
        last_from = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
        users = [ln.split(None, 1)[1].strip() for ln in lines[last_from:] if ln.upper().startswith("USER ")]
        assert users, f"{f.name}: the final stage sets no USER (runs as root)"
        user = users[-1].split(":")[0]
        assert user not in ("root", "0") and not user.startswith("$"), f"{f.name}: final USER {users[-1]}"
