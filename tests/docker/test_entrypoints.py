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

from tests.docker.dockerfile import DOCKERFILES, REPO, Stage, command_line, final_stage, healthcheck_argv
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


def healthcheck(stage: Stage, env: dict[str, str]) -> int:
    """Exit status of the image's HEALTHCHECK command run here with the container's environment."""
    argv = healthcheck_argv(stage)
    argv[0] = shutil.which(argv[0], path=str(VENV_BIN)) or argv[0]
    return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode


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
        assert healthcheck(stage, env) == 0, "HEALTHCHECK must pass on a ready server"
    assert healthcheck(stage, env) != 0, "HEALTHCHECK must fail when nothing answers"


def test_cpu_image_serves_its_bundled_model(tmp_path: Path) -> None:
    """Exactly `docker run IMAGE` (no bundle given): the default model shipped in serve/bundled/ is served."""
    from quickstep.serve.bundle import BundleError, bundled_default

    try:
        default = bundled_default()
    except BundleError:
        pytest.skip("serve/bundled/ holds no bundle yet")
    stage = final_stage(DOCKERFILES["Dockerfile"])
    port = free_port()
    env = host_env(stage, QUICKSTEP_PORT=str(port))
    log = tmp_path / "serve-default.log"
    url = f"http://127.0.0.1:{port}"
    with running(host_argv(stage), env, log) as proc:
        wait_ready(url, proc, log)
        models = httpx.get(f"{url}/v1/models", timeout=5).json()["models"]
        assert [m["name"] for m in models] == [bundle_name(default)]
        r = httpx.post(f"{url}/v1/generate", json={"n": 1, "seed": 0}, timeout=30)
        assert r.status_code == 200, r.text


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
        assert healthcheck(stage, env) == 0
    assert "serving with onnxruntime instead of tensorrt" in log.read_text()
    assert not cache.exists() or not any(cache.iterdir()), "no engine may be built without a GPU"


def test_train_image_default_command_is_valid() -> None:
    """docker/Dockerfile.train's CMD parses with quickstep-train's own parser and names a shipped preset."""
    from quickstep.train.cli import parse
    from quickstep.train.config import list_presets

    argv = command_line(final_stage(DOCKERFILES["Dockerfile.train"]))
    i = argv.index("quickstep.train.cli")
    assert argv[:i] == ["torchrun", "-m"], "torchrun runs the CLI module; its options come from PET_* variables"
    command, params = parse(argv[i + 1:])
    assert command == "fit" and params["preset"] in list_presets()
    assert params["out"].startswith("/runs/"), "runs land in the image's /runs volume"


@pytest.mark.slow  # ~13 s on 2 cores: three processes import torch
def test_train_image_entrypoint_runs_ddp(tmp_path: Path) -> None:
    """`torchrun -m quickstep.train.cli` with the image's PET_* environment trains with 2 processes (gloo)."""
    stage = final_stage(DOCKERFILES["Dockerfile.train"])
    env = stage.env()
    assert env["PET_NPROC_PER_NODE"] == "auto" and env["PET_NNODES"] == "1"
    entry = stage.exec_form("ENTRYPOINT")
    exe = shutil.which(entry[0], path=str(VENV_BIN))
    assert exe, f"{entry[0]} is not installed in {VENV_BIN}"
    out = tmp_path / "run"
    # what a user would pass: `docker run -e PET_NPROC_PER_NODE=2 IMAGE fit ...` (a tiny run instead of the CMD);
    # PET_MASTER_PORT only keeps parallel test runs on this shared host apart
    argv = [exe, *entry[1:], "fit", "--preset", "gmm2d-plain", "--out", str(out), "--steps", "2",
            "--set", "data.options.n=512", "--set", "log.sample_every=0"]
    full_env = host_env(stage, PET_NPROC_PER_NODE="2", PET_MASTER_PORT=str(free_port()))
    full_env.pop("OMP_NUM_THREADS", None)  # torchrun then announces that it starts several workers
    r = subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("trained 2 steps") == 1, "only rank 0 reports"
    assert "for each process" in r.stderr, "torchrun started more than one worker"
    assert (out / "step-0000002" / "model.safetensors").is_file()


def _to_host(arg: str, mounts: dict[str, Path]) -> str:
    """Rewrite a container path under one of `mounts` (container path -> host directory) to the host path."""
    for inside in sorted(mounts, key=len, reverse=True):
        if arg == inside or arg.startswith(inside + "/"):
            return str(mounts[inside]) + arg[len(inside):]
    return arg


def test_compose_triton_export_writes_the_repository_triton_serves(tiny_bundle: Path, tmp_path: Path) -> None:
    """compose's `triton-export` command (entrypoint + command, its volumes as host directories) writes a
    Triton model repository exactly where the `triton` service's --model-repository points."""
    import yaml
    from quickstep.export.cli import app
    from typer.testing import CliRunner

    services = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]
    export, triton = services["triton-export"], services["triton"]
    volume = tmp_path / "triton-repo"  # the named volume both services mount
    volume.mkdir()
    mounts = {"/bundle": tiny_bundle, next(v.split(":")[1] for v in export["volumes"] if v.startswith("triton-repo:")):
              volume}
    argv = [_to_host(a, mounts) for a in export["entrypoint"] + export["command"]]
    assert argv[0] == "quickstep-export" and shutil.which("quickstep-export", path=str(VENV_BIN))
    result = CliRunner().invoke(app, argv[1:])  # the console script's own typer app, in this process
    assert result.exit_code == 0, result.output
    t_mounts = {v.split(":")[1]: volume for v in triton["volumes"] if v.startswith("triton-repo:")}
    (flag,) = [c for c in triton["command"] if c.startswith("--model-repository=")]
    repo = Path(_to_host(flag.split("=", 1)[1], t_mounts))
    name = bundle_name(tiny_bundle)
    model_dir = repo / f"{name}_1step"
    assert (model_dir / "1" / "model.onnx").is_file(), sorted(p.name for p in repo.iterdir())
    config = (model_dir / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "dynamic_batching" in config
