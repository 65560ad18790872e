"""Client test fixtures: a scripted HTTP server we control (real uvicorn on 127.0.0.1) and a real
`quickstep-serve` process on a tiny exported bundle."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.helpers import free_port, tiny_checkpoint


# ------------------------------------------------------------------------------------------ scripted server
def png_bytes(value: int, size: int = 4) -> bytes:
    """A size x size grey PNG whose every pixel is `value` (so decoding can be checked exactly)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (size, size), value % 256).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Scripted:
    """What the scripted server answers next and what it has seen."""

    queue: list[tuple[int, dict[str, str], Any]] = field(default_factory=list)  # (status, headers, json body)
    every: tuple[int, int] | None = None  # (k, status): every k-th /v1/generate request answers `status`
    delay_s: float = 0.0
    hits: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.queue.clear()
            self.every, self.delay_s, self.hits = None, 0.0, 0
            self.requests.clear()


def make_scripted_app(state: Scripted):
    """A FastAPI app that speaks the serving contract but answers what the test scripted."""
    app = FastAPI()

    @app.post("/v1/generate")
    async def generate(request: Request) -> JSONResponse:
        body = await request.json()
        with state.lock:
            state.hits += 1
            hit = state.hits
            state.requests.append({"headers": dict(request.headers), "body": body})
            scripted = state.queue.pop(0) if state.queue else None
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        if scripted is not None:
            status, headers, payload = scripted
            return JSONResponse(payload, status_code=status, headers=headers)
        if state.every is not None and hit % state.every[0] == 0:
            return JSONResponse({"error": {"code": "queue_full", "message": "scripted"}}, status_code=state.every[1],
                                headers={"Retry-After": "0"})
        seed = body.get("seed") if body.get("seed") is not None else 12345
        n = body.get("n", 1)
        images = [{"index": k, "b64": base64.b64encode(png_bytes(seed + k)).decode(), "mime": "image/png"}
                  for k in range(n)]
        return JSONResponse({"model": body.get("model") or "scripted", "steps": body.get("steps") or 1, "seed": seed,
                             "latency_ms": 1.5, "images": images})

    @app.get("/health/live")
    async def live() -> JSONResponse:
        return JSONResponse({"status": "ok", "models": {}})

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        return JSONResponse({"status": "ok", "models": {"scripted": True}})

    return app


class UvicornThread:
    """A real uvicorn server for `app` on 127.0.0.1 in a daemon thread."""

    def __init__(self, app: Any):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("scripted server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def _scripted_server() -> Iterator[tuple[str, Scripted]]:
    state = Scripted()
    with UvicornThread(make_scripted_app(state)) as srv:
        yield srv.url, state


@pytest.fixture
def scripted(_scripted_server: tuple[str, Scripted]) -> tuple[str, Scripted]:
    """(url, state) of the scripted server, reset for this test."""
    _scripted_server[1].reset()
    return _scripted_server


# ------------------------------------------------------------------------------------------ real server
@pytest.fixture(scope="session")
def client_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 1x8x8 consistency bundle (steps 1 and 2) from the real exporter."""
    from quickstep.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("client-bundle")
    ckpt = tiny_checkpoint(root, kind="consistency", num_classes=0)
    return export_bundle(ckpt, root / "bundle", steps=(1, 2), parity_batches=(1,))


def serve_command() -> list[str]:
    """The installed `quickstep-serve` console script (falls back to `python -m quickstep.serve.cli`)."""
    script = Path(sys.executable).parent / "quickstep-serve"
    if script.exists():
        return [str(script)]
    found = shutil.which("quickstep-serve")
    return [found] if found else [sys.executable, "-m", "quickstep.serve.cli"]


@dataclass
class ServeProcess:
    url: str
    proc: subprocess.Popen
    log: Path

    def metric(self, name: str, **labels: str) -> float:
        """The value of one Prometheus sample (0 when absent) from GET /metrics."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        want = [f'{k}="{v}"' for k, v in labels.items()]
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                if all(w in line for w in want):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0


def start_serve(bundle: Path, log: Path, *extra: str, timeout: float = 90.0) -> ServeProcess:
    """Start `quickstep-serve --bundle B --host 127.0.0.1 --port P ...` and wait until /health/ready is 200."""
    port = free_port()
    cmd = [*serve_command(), "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port), "--no-ui",
           "--log-level", "warning", *extra]
    env = {**os.environ, "QUICKSTEP_INTRA_OP_THREADS": "1"}
    env.pop("QUICKSTEP_API_KEYS", None)
    fh = log.open("w")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"quickstep-serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                return ServeProcess(url, proc, log)
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_serve(proc)
            raise RuntimeError(f"quickstep-serve not ready after {timeout} s: {log.read_text()[-2000:]}")
        time.sleep(0.1)


def stop_serve(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="session")
def real_server(client_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """A real `quickstep-serve` process on the tiny bundle (max 16 images per request)."""
    srv = start_serve(client_bundle, tmp_path_factory.mktemp("serve-log") / "serve.log")
    try:
        yield srv
    finally:
        stop_serve(srv.proc)
