"""AOTInductor packages (slow: 40-90 s of compilation per graph on CPU) and TensorRT engines (GPU + TensorRT)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from quickstep.export.bundle import read_manifest, sha256_file
from quickstep.export.verify import verify_bundle


@pytest.mark.slow
def test_aoti_packages_match_eager_and_update_manifest(cm_bundle: Path, cm_ckpt: Path, tmp_path: Path) -> None:
    from quickstep.export.aoti import export_aoti_bundle, load_aoti
    from quickstep.train.core.checkpoint import load_model
    from quickstep.train.core.generator import ConsistencyGenerator

    bundle = Path(shutil.copytree(cm_bundle, tmp_path / "b"))
    results = export_aoti_bundle(bundle, device="cpu", max_batch=64)
    m = read_manifest(bundle).to_json()
    for steps in ("1", "2"):
        assert results[steps]["passed"] and results[steps]["max_abs_err_b7"] <= 1
        assert m["graphs"][steps]["aoti"] == f"generator_{steps}step.pt2"
        assert m["files"][f"generator_{steps}step.pt2"]["sha256"] == sha256_file(bundle / f"generator_{steps}step.pt2")
    # one package, several batch sizes, same images as eager
    runner = load_aoti(bundle / "generator_2step.pt2")
    gen = ConsistencyGenerator(load_model(cm_ckpt), 2).eval()
    for b in (1, 3, 64):
        g = torch.Generator().manual_seed(b)
        noise, noise2 = torch.randn(b, 1, 8, 8, generator=g), torch.randn(b, 1, 8, 8, generator=g)
        labels = torch.arange(b) % 10
        out = runner(noise, noise2, labels)
        out = out[0] if isinstance(out, (list, tuple)) else out
        with torch.no_grad():
            ref = gen(noise, noise2, labels)
        assert out.dtype == torch.uint8 and np.abs(out.numpy().astype(int) - ref.numpy().astype(int)).max() <= 1
    report = verify_bundle(bundle)
    assert report.ok and report.parity["aoti"]["1"].passed, report.summary()


@pytest.mark.gpu
@pytest.mark.trt
def test_tensorrt_engines_match_onnxruntime(cm_bundle: Path, tmp_path: Path) -> None:
    from quickstep.export.tensorrt import export_tensorrt_bundle
    from quickstep.export.triton import write_triton_repository

    bundle = Path(shutil.copytree(cm_bundle, tmp_path / "b"))
    results = export_tensorrt_bundle(bundle, batches=(1, 8), timing_cache=tmp_path / "timing.cache")
    m = read_manifest(bundle).to_json()
    for steps in ("1", "2"):
        assert results[steps]["passed"]
        plan = m["graphs"][steps]["tensorrt"]
        assert plan.endswith(".plan") and (bundle / plan).is_file() and plan in m["files"]
    assert (tmp_path / "timing.cache").stat().st_size > 0
    assert verify_bundle(bundle, parity=False).ok
    models = write_triton_repository(bundle, tmp_path / "repo", backend="tensorrt", max_batch=8)
    assert all((d / "1" / "model.plan").is_file() for d in models.values())
