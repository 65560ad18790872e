"""docker/gpu-entrypoint.sh's engine cache: build once per (GPU, TensorRT version), reuse after, never serve
half-built engines. No GPU here, so `quickstep-export` and `quickstep-serve` are small recording stand-ins on
PATH and the GPU is named through QUICKSTEP_GPU_KEY (what detection prints on a real GPU); the real
no-GPU path with the real server is in test_entrypoints.py."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.docker.dockerfile import DOCKER

SCRIPT = DOCKER / "gpu-entrypoint.sh"

FAKE_EXPORT = """#!/bin/sh
# records its arguments; writes an engine into the bundle passed with --bundle
echo "$@" >> "$QS_TEST_LOG/export.calls"
[ "$1" = tensorrt ] || exit 3
[ "$2" = --bundle ] || exit 4
[ -f "$3/manifest.json" ] || exit 5
echo plan > "$3/generator_1step.plan"
exit "${QS_TEST_EXPORT_RC:-0}"
"""

FAKE_SERVE = """#!/bin/sh
printf '{"args": "%s", "bundle": "%s", "backend": "%s", "models_dir": "%s"}\\n' "$*" "${QUICKSTEP_BUNDLE:-}" \
  "${QUICKSTEP_BACKEND:-}" "${QUICKSTEP_MODELS_DIR:-}" > "$QS_TEST_LOG/serve.json"
"""


@pytest.fixture
def sandbox(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("quickstep-export", FAKE_EXPORT), ("quickstep-serve", FAKE_SERVE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    models = tmp_path / "models"
    for name in ("alpha", "beta"):
        (models / name).mkdir(parents=True)
        (models / name / "manifest.json").write_text(json.dumps({"name": name}))
        (models / name / "generator_1step.onnx").write_text("onnx")
        for f in (models / name).iterdir():  # package data in an image is read-only for the app user
            f.chmod(stat.S_IRUSR | stat.S_IRGRP)
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUICKSTEP_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", QS_TEST_LOG=str(logs),
               QUICKSTEP_BACKEND="tensorrt", QUICKSTEP_ENGINE_CACHE=str(tmp_path / "cache"),
               QUICKSTEP_GPU_KEY="NVIDIA H200-sm90-trt10.13.3")
    return {"env": env, "models": models, "logs": logs, "cache": tmp_path / "cache"}


def run(sb: dict, **env: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    full = {**sb["env"], **env}
    r = subprocess.run(["sh", str(SCRIPT), "--host", "0.0.0.0"], env=full, capture_output=True, text=True, timeout=60)
    served = sb["logs"] / "serve.json"
    out = json.loads(served.read_text()) if served.exists() else None
    if served.exists():
        served.unlink()
    return r, out


def export_calls(sb: dict) -> list[str]:
    f = sb["logs"] / "export.calls"
    return f.read_text().splitlines() if f.exists() else []


def test_builds_once_per_gpu_and_reuses_the_cache(sandbox: dict) -> None:
    alpha = sandbox["models"] / "alpha"
    r, served = run(sandbox, QUICKSTEP_BUNDLE=str(alpha))
    assert r.returncode == 0, r.stderr
    key_dir = sandbox["cache"] / "NVIDIA_H200-sm90-trt10.13.3"
    dest = key_dir / "alpha"
    assert served == {"args": "--host 0.0.0.0", "bundle": str(dest), "backend": "tensorrt", "models_dir": ""}
    assert (dest / "generator_1step.plan").read_text() == "plan\n" and (dest / ".engines-complete").exists()
    assert not (alpha / "generator_1step.plan").exists(), "the source bundle is never modified"
    (call,) = export_calls(sandbox)
    assert call.startswith("tensorrt --bundle ") and call.endswith(f"--timing-cache {key_dir}/timing.cache")
    assert [p.name for p in key_dir.iterdir()] == ["alpha"], "no temporary directory is left behind"

    r, served = run(sandbox, QUICKSTEP_BUNDLE=str(alpha))
    assert r.returncode == 0 and served["bundle"] == str(dest)
    assert len(export_calls(sandbox)) == 1, "a second start must reuse the cached engines"
    assert "using cached TensorRT engines" in r.stderr

    r, served = run(sandbox, QUICKSTEP_BUNDLE=str(alpha), QUICKSTEP_GPU_KEY="NVIDIA L4-sm89-trt10.13.3")
    assert r.returncode == 0 and served["bundle"] == str(sandbox["cache"] / "NVIDIA_L4-sm89-trt10.13.3" / "alpha")
    assert len(export_calls(sandbox)) == 2, "another GPU model needs its own engines"


def test_models_dir_builds_every_bundle(sandbox: dict) -> None:
    r, served = run(sandbox, QUICKSTEP_MODELS_DIR=str(sandbox["models"]), QUICKSTEP_TRT_EXPORT_ARGS="--batch 1,64")
    assert r.returncode == 0, r.stderr
    key_dir = sandbox["cache"] / "NVIDIA_H200-sm90-trt10.13.3"
    assert served["bundle"] == f"{key_dir / 'alpha'},{key_dir / 'beta'}"
    assert served["models_dir"] == "", "the engine-carrying copies replace QUICKSTEP_MODELS_DIR"
    assert all(c.endswith("timing.cache --batch 1,64") for c in export_calls(sandbox)) and len(export_calls(sandbox)) == 2


def test_failed_build_leaves_no_cache_entry(sandbox: dict) -> None:
    alpha = sandbox["models"] / "alpha"
    r, served = run(sandbox, QUICKSTEP_BUNDLE=str(alpha), QS_TEST_EXPORT_RC="1")
    assert r.returncode != 0 and served is None, "the server must not start on a failed engine build"
    key_dir = sandbox["cache"] / "NVIDIA_H200-sm90-trt10.13.3"
    assert not (key_dir / "alpha").exists()
    assert not list(key_dir.iterdir()), "the half-built copy is removed"
    r, served = run(sandbox, QUICKSTEP_BUNDLE=str(alpha))
    assert r.returncode == 0 and (key_dir / "alpha" / ".engines-complete").exists()


def test_no_gpu_fallback_and_fail_modes(sandbox: dict) -> None:
    env = {"QUICKSTEP_GPU_KEY": "", "QUICKSTEP_BUNDLE": str(sandbox["models"] / "alpha"),
           "QUICKSTEP_PYTHON": "false"}  # detection finds nothing, as on a machine without a GPU
    r, served = run(sandbox, **env)
    assert r.returncode == 0 and served["backend"] == "onnxruntime"
    assert served["bundle"] == env["QUICKSTEP_BUNDLE"] and not export_calls(sandbox)
    r, served = run(sandbox, **env, QUICKSTEP_TRT_FALLBACK="fail")
    assert r.returncode == 1 and served is None and "QUICKSTEP_TRT_FALLBACK=fail" in r.stderr
    r, served = run(sandbox, **env, QUICKSTEP_TRT_FALLBACK="cpu")
    assert r.returncode == 2 and "must be 'onnxruntime' or 'fail'" in r.stderr


def test_other_backends_pass_straight_through(sandbox: dict) -> None:
    r, served = run(sandbox, QUICKSTEP_BACKEND="torch", QUICKSTEP_BUNDLE="/somewhere")
    assert r.returncode == 0 and served == {"args": "--host 0.0.0.0", "bundle": "/somewhere", "backend": "torch",
                                            "models_dir": ""}
    assert not export_calls(sandbox)
