"""The serving fast path on CUDA (skipped without it): the torch backend compiled with CUDA graphs, batch buckets,
bfloat16 weights, channels_last and pinned host buffers; AOTInductor packages compiled for CUDA."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from quickstep.serve.backends.base import create_backend
from quickstep.serve.bundle import load_bundle
from quickstep.serve.service import draw_labels, draw_noise
from quickstep.serve.settings import ServeSettings

pytestmark = pytest.mark.gpu


def _request(b, seed: int, n: int, steps: int):
    nn = len(b.graphs[steps].noise_inputs)
    return draw_noise(seed, n, b.image_shape, nn), draw_labels(seed, n, b.num_classes, nn, b.image_shape)


def test_torch_backend_cuda_compile_buckets_pinned(cond_bundle_dir):
    b = load_bundle(cond_bundle_dir)
    cpu = create_backend(b, ServeSettings(backend="torch", device="cpu", max_batch=4))
    gpu = create_backend(b, ServeSettings(backend="torch", device="cuda", max_batch=4, torch_compile=True,
                                          torch_compile_mode="reduce-overhead", torch_dtype="bfloat16",
                                          torch_channels_last=True))
    cpu.load()
    gpu.load()
    assert gpu.device == "cuda" and gpu.runner.cuda and gpu.runner.buckets == [1, 2, 4]
    gpu.warmup()
    for steps in b.steps_supported:
        for n in (1, 3, 4, 6):  # 3 pads to 4; 6 splits into 4 + 2
            noises, labels = _request(b, 50 + n, n, steps)
            got, ref = gpu.run(steps, noises, labels), cpu.run(steps, noises, labels)
            assert got.shape == ref.shape and got.dtype == np.uint8
            diff = np.abs(got.astype(int) - ref.astype(int))
            assert diff.mean() < 1.5 and diff.max() <= 12, (steps, n, diff.mean(), diff.max())
    # the pinned output buffer is reused: earlier results must not change under later calls
    noises, labels = _request(b, 7, 2, 1)
    first = gpu.run(1, noises, labels)
    keep = first.copy()
    gpu.run(1, *_request(b, 8, 2, 1))
    np.testing.assert_array_equal(first, keep)


def test_aoti_cuda_package_with_buckets(cond_bundle_dir, tmp_path):
    from quickstep.export.aoti import export_aoti_bundle

    bundle = Path(shutil.copytree(cond_bundle_dir, tmp_path / "b"))
    res = export_aoti_bundle(bundle, device="cuda", max_batch=8, parity_batches=(1, 5))
    assert res["1"]["passed"] and res["2"]["passed"]
    b = load_bundle(bundle)
    be = create_backend(b, ServeSettings(backend="aoti", device="cuda", max_batch=8, batch_buckets="on"))
    be.preflight()
    be.load()
    assert be.device == "cuda" and be.runner.buckets == [1, 2, 4, 8]
    cpu = create_backend(b, ServeSettings(backend="torch", device="cpu", max_batch=8))
    cpu.load()
    noises, labels = _request(b, 3, 5, 1)
    diff = np.abs(be.run(1, noises, labels).astype(int) - cpu.run(1, noises, labels).astype(int))
    assert diff.max() <= 1
