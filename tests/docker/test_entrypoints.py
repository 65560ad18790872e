"""Each image's entrypoint, run outside Docker: the Dockerfile's own ENTRYPOINT + CMD and ENV, read from the
Dockerfile, with only what `docker run` would change (bind 127.0.0.1 instead of 0.0.0.0, a free port, a
bundle and a cache directory standing in for volumes). The serving images must reach /health/ready = 200.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.docker.dockerfile import DOCKERFILES, REPO, Stage, command_line, final_stage
from tests.helpers import free_port, tiny_checkpoint

VENV_BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 1x8x8 consistency bundle (1-step graph) written by the exporter."""
    from quickstep.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("docker-bundle")
    return export_bundle(tiny_checkpoint(root), root / "tiny", steps=(1,), parity_batches=(1,))


def bundle_name(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["name"]


def host_argv(stage: Stage, port: int | None = None) -> list[str]:
    """The image's command line with its executable resolved on this machine and --host 0.0.0.0 -> 127.0.0.1."""
    argv = command_line(stage)
    assert argv, "the image has no ENTRYPOINT/CMD"
    exe = argv[0]
    copied = {dest: srcs[0] for srcs, dest, _ in stage.copies() if len(srcs) == 1}
    by_name = {Path(dest).name: src for dest, src in copied.items()}
    if exe in copied or exe in by_name:  # a script the Dockerfile COPYs onto the PATH: run the repo's file
        resolved = REPO / (copied.get(exe) or by_name[exe])
    else:
        found = shutil.which(exe, path=str(VENV_BIN))
        assert found, f"{exe!r} (the image's entrypoint) is not installed in {VENV_BIN}"
        resolved = Path(found)
    assert resolved.is_file() and os.access(resolved, os.X_OK), f"{resolved} is not an executable file"
    argv = [str(resolved), *argv[1:]]
    if "--host" in argv:
        i = argv.index("--host")
        assert argv[i + 1] == "0.0.0.0", "a container must bind 0.0.0.0 to be reachable through its published port"
        argv[i + 1] = "127.0.0.1"
    return argv


def host_env(stage: Stage, **overrides: str) -> dict[str, str]:
    """This process's environment without any QUICKSTEP_*, plus the image's ENV, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUICKSTEP_", "PET_"))}
    for key, value in stage.env().items():
        if key == "PATH":  # the image puts its venv first; here that is this interpreter's venv
            assert value.startswith("/opt/venv/bin:"), value
            continue
        env[key] = value
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env.update(overrides)
    return env


@contextlib.contextmanager
def running(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Start `argv` in its own process group; on exit SIGTERM (then SIGKILL) that group only."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
                                start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = READY_TIMEOUT_S) -> float:
    """Poll /health/ready until 200; fail with the server's output if it exits or the time runs out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"the entrypoint exited with {proc.returncode} before it was ready:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"/health/ready was not 200 within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def test_cpu_image_entrypoint_serves_ready(tiny_bundle: Path, tmp_path: Path) -> None:
    """docker/Dockerfile: `quickstep-serve --host 0.0.0.0` with the image's QUICKSTEP_* reaches ready."""
    stage = final_stage(DOCKERFILES["Dockerfile"])
    port = free_port()
    argv = host_argv(stage)
    assert Path(argv[0]).name == "quickstep-serve"
    env = host_env(stage, QUICKSTEP_PORT=str(port), QUICKSTEP_BUNDLE=str(tiny_bundle))
    log = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with running(argv, env, log) as proc:
        wait_ready(url, proc, log)
        models = httpx.get(f"{url}/v1/models", timeout=5).json()["models"]
        assert [(m["name"], m["ready"]) for m in models] == [(bundle_name(tiny_bundle), True)]
        assert models[0]["backend"].startswith("onnxruntime") and "CUDA" not in models[0]["backend"]
        assert httpx.get(f"{url}/health/live", timeout=5).status_code == 200
        metrics = httpx.get(f"{url}/metrics", timeout=5)
        assert metrics.status_code == 200 and "# TYPE" in metrics.text
        r = httpx.post(f"{url}/v1/generate", json={"n": 2, "seed": 3}, timeout=30)
        assert r.status_code == 200, r.text
        assert len(r.json()["images"]) == 2


def test_gpu_image_entrypoint_falls_back_to_onnxruntime_without_gpu(tiny_bundle: Path, tmp_path: Path) -> None:
    """docker/Dockerfile.gpu's entrypoint on a machine without CUDA/TensorRT: serves with onnxruntime, ready."""
    stage = final_stage(DOCKERFILES["Dockerfile.gpu"])
    port = free_port()
    argv = host_argv(stage)
    assert Path(argv[0]).name == "gpu-entrypoint.sh"
    assert stage.env()["QUICKSTEP_BACKEND"] == "tensorrt"
    cache = tmp_path / "cache"  # stands in for the /cache volume
    env = host_env(stage, QUICKSTEP_PORT=str(port), QUICKSTEP_BUNDLE=str(tiny_bundle),
                   QUICKSTEP_ENGINE_CACHE=str(cache))
    log = tmp_path / "serve-gpu.log"
    url = f"http://127.0.0.1:{port}"
    with running(argv, env, log) as proc:
        wait_ready(url, proc, log)
        models = httpx.get(f"{url}/v1/models", timeout=5).json()["models"]
        assert [m["name"] for m in models] == [bundle_name(tiny_bundle)]
        assert models[0]["backend"].startswith("onnxruntime"), models[0]["backend"]
    assert "serving with onnxruntime instead of tensorrt" in log.read_text()
    assert not cache.exists() or not any(cache.iterdir()), "no engine may be built without a GPU"
