"""Serve test fixtures: tiny bundles made with export_bundle and real uvicorn servers on 127.0.0.1 (threads)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from quickstep.serve.settings import ServeSettings

from tests.helpers import free_port, tiny_checkpoint


def make_bundle(root: Path, num_classes: int = 0, kind: str = "consistency") -> Path:
    """A tiny 1x8x8 bundle (steps 1 and 2) exported by the real exporter."""
    from quickstep.export.bundle import export_bundle

    ckpt = tiny_checkpoint(root, kind=kind, num_classes=num_classes)
    steps = (1, 2)
    return export_bundle(ckpt, root / f"bundle-{kind}-{num_classes}", steps=steps, heun_steps=(2,),
                         parity_batches=(1, 3))


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Unconditional tiny consistency bundle."""
    return make_bundle(tmp_path_factory.mktemp("bundle"), num_classes=0)


@pytest.fixture(scope="session")
def cond_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class-conditional (10 classes) tiny consistency bundle."""
    return make_bundle(tmp_path_factory.mktemp("cbundle"), num_classes=10)


class ServerThread:
    """uvicorn.Server for create_app(settings) in a background thread; `url`, `stop()`."""

    def __init__(self, settings: ServeSettings):
        import uvicorn
        from quickstep.serve.app import create_app

        self.app = create_app(settings)
        self.port = settings.port
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=10, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name=f"uvicorn-{self.port}")

    def start(self, wait_ready: bool = True, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        if wait_ready:
            self.wait_ready(deadline - time.monotonic())
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            r = httpx.get(self.url + "/health/ready", timeout=5)
            if r.status_code == 200:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready: {r.text}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@contextlib.contextmanager
def serve(wait_ready: bool = True, **kw) -> Iterator[ServerThread]:
    """Run a server with ServeSettings(port=free, **kw) for the duration of the block."""
    kw.setdefault("port", free_port())
    kw.setdefault("ui", False)
    srv = ServerThread(ServeSettings(**kw)).start(wait_ready=wait_ready)
    try:
        yield srv
    finally:
        srv.stop()


def hold_worker(server: ServerThread) -> threading.Event:
    """Occupy the CPU worker thread until the returned event is set, so that requests queue up meanwhile."""
    gate = threading.Event()
    server.app.state.service.executor("cpu").submit(gate.wait, 60)
    return gate


def wait_queued(server: ServerThread, n: int, timeout: float = 30.0, *, counting: str = "depth") -> None:
    """Block until at least n requests wait in the server's queues (all models).  counting="outstanding" also counts
    those the collector already took into a batch that waits for the held worker (how many it takes first depends on
    when the requests arrive, so "every request has reached the server" must count those too)."""
    models = server.app.state.service.models.values()
    deadline = time.monotonic() + timeout
    while sum(getattr(rt.batcher, counting) for rt in models if rt.batcher is not None) < n:
        assert time.monotonic() < deadline, f"fewer than {n} requests {'queued' if counting == 'depth' else counting}"
        time.sleep(0.005)
