"""Backends behind one interface: torch (train.core reference) vs onnxruntime on the same bundle and noise."""

from __future__ import annotations

import numpy as np
import pytest
from quickstep.serve.backends.base import BackendError, create_backend
from quickstep.serve.bundle import BundleError, load_bundle
from quickstep.serve.service import draw_labels, draw_noise
from quickstep.serve.settings import ServeSettings


@pytest.mark.parametrize("fixture", ["bundle_dir", "cond_bundle_dir"])
def test_torch_matches_onnxruntime(request, fixture):
    b = load_bundle(request.getfixturevalue(fixture))
    ort = create_backend(b, ServeSettings(backend="onnxruntime", max_batch=4))
    pt = create_backend(b, ServeSettings(backend="torch", max_batch=4))
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


def test_noise_convention():
    """Image k of seed s: default_rng([s, k]) standard_normal (C,H,W) float32, second draw = noise2."""
    n1, n2 = draw_noise(7, 3, (1, 4, 4), 2)
    rng = np.random.default_rng([7, 2])
    assert np.array_equal(n1[2], rng.standard_normal((1, 4, 4), dtype=np.float32))
    assert np.array_equal(n2[2], rng.standard_normal((1, 4, 4), dtype=np.float32))
    assert np.array_equal(draw_noise(7, 1, (1, 4, 4), 1)[0][0], n1[0])  # independent of n
    labels = draw_labels(7, 50, 10, 2, (1, 4, 4))
    assert labels.min() >= 0 and labels.max() <= 9 and len(set(labels.tolist())) > 3


def test_unavailable_backends_fail_clearly(cond_bundle_dir):
    b = load_bundle(cond_bundle_dir)
    with pytest.raises(BundleError, match="AOTInductor"):
        create_backend(b, ServeSettings(backend="aoti")).load()
    with pytest.raises(BackendError, match="tensorrt|TensorRT"):
        create_backend(b, ServeSettings(backend="tensorrt")).load()
    with pytest.raises(BackendError, match="cuda"):
        create_backend(b, ServeSettings(backend="onnxruntime", device="cuda")).load()
