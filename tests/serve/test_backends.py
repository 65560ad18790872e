"""Backends behind one interface: torch (train.core reference) vs onnxruntime on the same bundle and noise."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from quickstep.serve.backends.base import BackendError, create_backend
from quickstep.serve.bundle import BundleError, load_bundle
from quickstep.serve.service import draw_labels, draw_noise
from quickstep.serve.settings import ServeSettings

from quickstep.artifacts import BundleManifest


@pytest.mark.parametrize("fixture", ["bundle_dir", "cond_bundle_dir"])
def test_torch_matches_onnxruntime(request, fixture):
    b = load_bundle(request.getfixturevalue(fixture))
    ort = create_backend(b, ServeSettings(backend="onnxruntime", device="cpu", max_batch=4))
    pt = create_backend(b, ServeSettings(backend="torch", device="cpu", max_batch=4))
    ort.load()
    pt.load()
    assert ort.device == "cpu" and pt.device == "cpu" and "CPUExecutionProvider" in ort.describe()
    for steps in b.steps_supported:
        nn = len(b.graphs[steps].noise_inputs)
        noises = draw_noise(99, 5, b.image_shape, nn)
        labels = draw_labels(99, 5, b.num_classes, nn, b.image_shape) if b.num_classes else None
        a, t = ort.run(steps, noises, labels), pt.run(steps, noises, labels)
        assert a.dtype == t.dtype == np.uint8 and a.shape == t.shape == (5, 8, 8, 1)
        assert np.abs(a.astype(int) - t.astype(int)).max() <= 1, steps
        assert a.std() > 0  # not a constant image


def test_torch_backend_runs_train_core_generators_through_the_entry_point():
    """serve imports nothing of train: its torch backend gets train.core's generator modules through the
    quickstep.generators entry point, and they give the pixels train.core's own modules give (bundled model)."""
    import torch
    from quickstep.serve.bundle import bundled_default
    from quickstep.train.core.checkpoint import load_model
    from quickstep.train.core.generator import generator_module

    b = load_bundle(bundled_default())
    pt = create_backend(b, ServeSettings(backend="torch", device="cpu", max_batch=4))
    pt.load()
    model = load_model(b.path)
    for steps in b.steps_supported:
        nn = len(b.graphs[steps].noise_inputs)
        noises, labels = draw_noise(5, 3, b.image_shape, nn), np.array([7, 0, 3], np.int64)
        with torch.inference_mode():
            ref = generator_module(model, b.kind, steps, ts=b.times[steps])(
                *[torch.from_numpy(x) for x in noises], torch.from_numpy(labels)).numpy()
        assert np.array_equal(pt.run(steps, noises, labels), ref), steps


def test_noise_convention():
    """Image k of seed s: default_rng([s, k]) standard_normal (C,H,W) float32, second draw = noise2."""
    n1, n2 = draw_noise(7, 3, (1, 4, 4), 2)
    rng = np.random.default_rng([7, 2])
    assert np.array_equal(n1[2], rng.standard_normal((1, 4, 4), dtype=np.float32))
    assert np.array_equal(n2[2], rng.standard_normal((1, 4, 4), dtype=np.float32))
    assert np.array_equal(draw_noise(7, 1, (1, 4, 4), 1)[0][0], n1[0])  # independent of n
    labels = draw_labels(7, 50, 10, 2, (1, 4, 4))
    assert labels.min() >= 0 and labels.max() <= 9 and len(set(labels.tolist())) > 3


def test_unavailable_backends_fail_clearly(cond_bundle_dir, monkeypatch):
    """Holds on any host: with or without a GPU, onnxruntime-gpu or TensorRT installed."""
    b = load_bundle(cond_bundle_dir)
    with pytest.raises(BundleError, match="AOTInductor"):
        create_backend(b, ServeSettings(backend="aoti")).load()
    # no TensorRT / no GPU: BackendError; TensorRT on a GPU: the bundle has no *.plan (BundleError)
    with pytest.raises((BackendError, BundleError), match="tensorrt|TensorRT"):
        create_backend(b, ServeSettings(backend="tensorrt")).load()
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])  # a CPU-only host
    with pytest.raises(BackendError, match="cuda"):
        create_backend(b, ServeSettings(backend="onnxruntime", device="cuda")).load()


# ----------------------------------------------------------------------------------------------- fake bundles
def edited_bundle(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None], files: tuple[str, ...] = ()):
    """A copy of bundle `src` whose manifest went through `edit`, plus empty placeholder `files` (verify=False)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    for f in files:
        (dst / f).write_bytes(b"placeholder")
    return load_bundle(dst, verify=False)


def aoti_bundle(src: Path, dst: Path, device: str | None):
    def edit(m):
        for k in m["graphs"]:
            m["graphs"][k]["aoti"] = f"generator_{k}step.pt2"
        if device is not None:
            m["aoti"] = {"device": device, "max_batch": 64, "torch_version": "2.13.0"}

    return edited_bundle(src, dst, edit, ("generator_1step.pt2", "generator_2step.pt2"))


def test_aoti_device_comes_from_the_package(bundle_dir, tmp_path):
    from quickstep.serve.backends.aoti import package_device

    cpu = aoti_bundle(bundle_dir, tmp_path / "cpu", "cpu")
    gpu = aoti_bundle(bundle_dir, tmp_path / "cuda", "cuda")
    old = aoti_bundle(bundle_dir, tmp_path / "old", None)
    auto, on_cpu, on_cuda = (ServeSettings(backend="aoti", device=d) for d in ("auto", "cpu", "cuda"))
    assert package_device(cpu, auto, cuda_available=True) == "cpu"  # never CUDA tensors into a CPU package
    assert package_device(cpu, on_cpu, cuda_available=True) == "cpu"
    assert package_device(gpu, auto, cuda_available=True) == "cuda"
    with pytest.raises(BackendError, match="compiled for CUDA.*no usable CUDA"):
        package_device(gpu, auto, cuda_available=False)
    with pytest.raises(BackendError, match="compiled for 'cpu'.*--device cuda"):
        package_device(cpu, on_cuda, cuda_available=True)
    with pytest.raises(BackendError, match="compiled for 'cuda'.*--device cpu"):
        package_device(gpu, on_cpu, cuda_available=True)
    assert package_device(old, auto, cuda_available=True) == "cuda"  # no record: --device as before
    assert package_device(old, auto, cuda_available=False) == "cpu"


def test_aoti_backend_feeds_a_cpu_package_cpu_tensors_on_a_gpu_host(bundle_dir, tmp_path, monkeypatch):
    """--device auto on a (pretend) CUDA host: a CPU-compiled package still gets CPU tensors."""
    import torch
    import torch._inductor

    b = aoti_bundle(bundle_dir, tmp_path / "b", "cpu")
    seen: list[str] = []

    def fake_load(path):
        def runner(*args):
            seen.extend(str(a.device) for a in args)
            c, h, w = b.image_shape
            return torch.zeros((args[0].shape[0], h, w, c), dtype=torch.uint8)

        return runner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", fake_load)
    backend = create_backend(b, ServeSettings(backend="aoti", device="auto"))
    backend.preflight()
    assert backend.device == "cpu"
    backend.load()
    out = backend.run(2, draw_noise(1, 3, b.image_shape, 2), None)
    assert out.shape == (3, 8, 8, 1) and backend.device == "cpu" and seen == ["cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu = aoti_bundle(bundle_dir, tmp_path / "g", "cuda")
    with pytest.raises(BackendError, match="compiled for CUDA"):
        create_backend(gpu, ServeSettings(backend="aoti")).preflight()


# ----------------------------------------------------------------------------------------------- TensorRT plans
A100, H200 = "NVIDIA_A100_SXM4_80GB.trt10.13.3", "NVIDIA_H200.trt10.13.3"


def trt_bundle(src: Path, dst: Path):
    """Plans for two GPUs per graph; graphs[k]['tensorrt'] names the latest build (the A100 one)."""
    tags = (H200, A100)

    def edit(m):
        for k in m["graphs"]:
            plans = {tag: f"generator_{k}step.{tag}.plan" for tag in tags}
            m["graphs"][k]["tensorrt_plans"] = plans
            m["graphs"][k]["tensorrt"] = plans[A100]
        m["tensorrt"] = {tag: {"trt_version": "10.13.3", "batch_buckets": [1, 8, 32]} for tag in tags}

    return edited_bundle(src, dst, edit, tuple(f"generator_{k}step.{t}.plan" for k in (1, 2) for t in tags))


def test_tensorrt_plan_for_this_gpu_and_version_is_selected(bundle_dir, tmp_path):
    from quickstep.serve.backends.tensorrt import select_plan

    b = trt_bundle(bundle_dir, tmp_path / "b")
    assert select_plan(b, 1, H200).name == f"generator_1step.{H200}.plan"  # not the latest (A100) build
    assert select_plan(b, 2, H200).name == f"generator_2step.{H200}.plan"
    assert select_plan(b, 2, A100).name == f"generator_2step.{A100}.plan"
    with pytest.raises(BundleError) as e:
        select_plan(b, 1, "NVIDIA_L4.trt10.13.3")
    msg = str(e.value)
    assert "NVIDIA_L4.trt10.13.3" in msg and A100 in msg and H200 in msg and "quickstep-export tensorrt" in msg
    with pytest.raises(BundleError, match="plans available"):
        select_plan(b, 1, "NVIDIA_H200.trt10.14.1")  # same GPU, other TensorRT version


def test_tensorrt_plan_without_per_gpu_record(bundle_dir, tmp_path):
    """Older manifests name one plan: its file-name tag must match; an untagged name is loaded as is."""
    from quickstep.serve.backends.tensorrt import select_plan

    def only_latest(m):
        for k in m["graphs"]:
            m["graphs"][k]["tensorrt"] = f"generator_{k}step.{A100}.plan"

    b = edited_bundle(bundle_dir, tmp_path / "a", only_latest, (f"generator_1step.{A100}.plan",
                                                                  f"generator_2step.{A100}.plan"))
    assert select_plan(b, 1, A100).name == f"generator_1step.{A100}.plan"
    with pytest.raises(BundleError, match=f"no TensorRT engine for this GPU.*{H200}.*available: {A100}"):
        select_plan(b, 1, H200)

    def untagged(m):
        for k in m["graphs"]:
            m["graphs"][k]["tensorrt"] = f"generator_{k}step.plan"

    u = edited_bundle(bundle_dir, tmp_path / "u", untagged, ("generator_1step.plan", "generator_2step.plan"))
    assert select_plan(u, 1, H200).name == "generator_1step.plan"
    with pytest.raises(BundleError, match=r"no TensorRT engine \(\*\.plan\)"):
        select_plan(load_bundle(bundle_dir), 1, H200)


def test_tensorrt_plan_tag_matches_the_exporter(monkeypatch):
    import torch
    from quickstep.export.tensorrt import engine_tag
    from quickstep.serve.backends.tensorrt import plan_tag

    class FakeTrt:
        __version__ = "10.13.3"

    for gpu in ("NVIDIA H200", "NVIDIA A100-SXM4-80GB", "Tesla T4 (x)"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0, gpu=gpu: gpu)
        assert plan_tag(gpu, FakeTrt.__version__) == engine_tag(FakeTrt)
    assert plan_tag("NVIDIA H200", "10.13.3") == H200


# ----------------------------------------------------------------------------------------------- ORT TensorRT EP
def test_ort_tensorrt_engine_cache_lives_outside_the_bundle(bundle_dir, tmp_path, monkeypatch):
    """With the TensorRT provider (faked here), engines are cached under $XDG_CACHE_HOME/quickstep/ort-trt/<sha>,
    never inside the bundle: the bundle stays exactly its manifest's files (quickstep-export verify passes)."""
    import hashlib

    import onnxruntime
    from quickstep.export.verify import VerifyReport, check_hashes

    src = tmp_path / "bundle"
    shutil.copytree(bundle_dir, src)
    b = load_bundle(src)
    before = sorted(p.relative_to(src).as_posix() for p in src.rglob("*"))
    created: list[list[Any]] = []

    class FakeSession:
        def __init__(self, path, sess_options=None, providers=None):
            created.append(providers)
            for p in providers:
                if isinstance(p, tuple) and p[0] == "TensorrtExecutionProvider":  # what the real provider does
                    (Path(p[1]["trt_engine_cache_path"]) / f"{Path(path).stem}.engine").write_bytes(b"engine")
            self._providers = [p[0] if isinstance(p, tuple) else p for p in providers]

        def get_providers(self):
            return self._providers

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", FakeSession)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    backend = create_backend(b, ServeSettings(backend="onnxruntime", ort_tensorrt=True))
    backend.load()
    sha = hashlib.sha256((src / "manifest.json").read_bytes()).hexdigest()[:16]
    cache = tmp_path / "xdg" / "quickstep" / "ort-trt" / sha
    trt = created[0][0]
    assert trt[0] == "TensorrtExecutionProvider" and trt[1]["trt_engine_cache_path"] == str(cache)
    assert trt[1]["trt_timing_cache_path"] == str(cache)
    assert sorted(p.name for p in cache.iterdir()) == ["generator_1step.engine", "generator_2step.engine"]
    assert sorted(p.relative_to(src).as_posix() for p in src.rglob("*")) == before
    report = VerifyReport(src)
    check_hashes(src, BundleManifest.read(src), report)
    assert report.ok, report.failures
    assert backend.describe() == "onnxruntime (TensorrtExecutionProvider)"

    # an explicit root wins; an unwritable one is a clear error naming the setting
    other = create_backend(b, ServeSettings(backend="onnxruntime", ort_tensorrt=True,
                                            ort_trt_cache_dir=tmp_path / "mine"))
    assert other.trt_cache_dir() == tmp_path / "mine" / sha
    (tmp_path / "file").write_text("x")
    bad = create_backend(b, ServeSettings(backend="onnxruntime", ort_tensorrt=True,
                                          ort_trt_cache_dir=tmp_path / "file"))
    with pytest.raises(BackendError, match="ort-trt-cache-dir"):
        bad.load()


def test_ort_tensorrt_flag_and_environment(monkeypatch, tmp_path):
    from quickstep.serve.cli import parse_overrides

    s = ServeSettings(**parse_overrides(["--ort-tensorrt", "--ort-trt-cache-dir", str(tmp_path)]))
    assert s.ort_tensorrt is True and s.ort_trt_cache_root() == tmp_path
    assert parse_overrides([]) == {} and ServeSettings(**parse_overrides([])).ort_tensorrt is False
    monkeypatch.setenv("QUICKSTEP_ORT_TENSORRT", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    s = ServeSettings()
    assert s.ort_tensorrt is True and s.ort_trt_cache_root() == tmp_path / "x" / "quickstep" / "ort-trt"
