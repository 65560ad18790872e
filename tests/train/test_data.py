"""Data sets: analytic Gaussian mixtures, digits, npz, folder, cifar10 (synthetic local batches)."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from quickstep.train.data import (
    CIFAR_NAMES,
    DATASETS,
    GMM_PRESETS,
    Dataset,
    DataSpec,
    GaussianMixture,
    gmm_preset,
    load_dataset,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------- gmm
@pytest.mark.parametrize("preset", sorted(GMM_PRESETS))
def test_gmm_score_is_autograd_of_log_density_and_tweedie_holds(preset):
    mix = gmm_preset(preset)
    x = (mix.sample(64, _gen(1), dtype=torch.float64) * 1.5).requires_grad_(True)
    for sigma in (0.0, 0.05, 0.7, torch.logspace(-2, 1, 64, dtype=torch.float64)):
        lp = mix.log_prob_sigma(x, sigma)
        (grad,) = torch.autograd.grad(lp.sum(), x)
        score = mix.score(x.detach(), sigma)
        torch.testing.assert_close(score, grad, rtol=1e-8, atol=1e-8)
        s2 = (torch.as_tensor(sigma, dtype=torch.float64) ** 2).reshape(-1, 1)
        torch.testing.assert_close(mix.denoise(x.detach(), sigma), x.detach() + s2 * score, rtol=1e-8, atol=1e-8)
    assert mix.score(x.detach().float(), 0.3).dtype == torch.float32


def test_gmm_denoiser_matches_monte_carlo_posterior_mean():
    """E[x0 | x_sigma] by self-normalised importance sampling from the prior: w ~ N(x_sigma; x0, sigma^2 I)."""
    mix = gmm_preset("aniso")
    x0 = mix.sample(400_000, _gen(2), dtype=torch.float64)  # [M, 2]
    sigma = 0.4
    xs = torch.tensor([[0.0, 0.0], [0.5, -0.3], [-0.5, 0.5]], dtype=torch.float64)
    logw = -((xs[:, None, :] - x0[None]) ** 2).sum(-1) / (2 * sigma**2)  # [3, M]
    w = torch.softmax(logw, dim=1)
    mc = w @ x0
    torch.testing.assert_close(mix.denoise(xs, sigma), mc, atol=0.01, rtol=0)


def test_gmm_log_prob_against_reference_and_normalised():
    mix = GaussianMixture([[0.2, -0.1]], covs=[[[0.3, 0.1], [0.1, 0.2]]])
    x = torch.randn(10, 2, generator=_gen(3), dtype=torch.float64)
    ref = torch.distributions.MultivariateNormal(mix.means[0], mix.covs[0] + 0.25 * torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(mix.log_prob_sigma(x, 0.5), ref.log_prob(x))
    bi = gmm_preset("bimodal1d")
    grid = torch.linspace(-4, 4, 20001, dtype=torch.float64)[:, None]
    for sigma in (0.0, 0.3):
        mass = torch.trapezoid(bi.log_prob_sigma(grid, sigma).exp(), grid[:, 0])
        assert float(mass) == pytest.approx(1.0, abs=1e-6)


def test_gmm_sampling_moments_and_presets():
    for preset in GMM_PRESETS:
        mix = gmm_preset(preset)
        x = mix.sample(40_000, _gen(4), dtype=torch.float64)
        torch.testing.assert_close(x.mean(0), mix.mean(), atol=0.015, rtol=0)
        torch.testing.assert_close(torch.cov(x.T).reshape(mix.dim, mix.dim), mix.covariance(), atol=0.015, rtol=0)
    ring = gmm_preset("ring8")
    assert ring.num_components == 8 and ring.dim == 2
    torch.testing.assert_close(ring.means.norm(dim=1), torch.ones(8, dtype=torch.float64))
    aniso = gmm_preset("aniso")
    lam = torch.linalg.eigvalsh(aniso.covs)
    assert bool((lam[:, 1] / lam[:, 0] > 4).all())  # really anisotropic
    assert not torch.allclose(aniso.covs[:, 0, 1], torch.zeros(3, dtype=torch.float64))  # full covariance
    assert gmm_preset("gauss1d").dim == 1 and gmm_preset("bimodal1d").num_components == 2
    a, b = ring.sample(5, _gen(9)), ring.sample(5, _gen(9))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="ring8"):
        gmm_preset("spiral")


def test_gmm_trigflow_view_gaussian_closed_form():
    s, sd = 0.5, 0.5
    mix = gmm_preset("gauss1d")  # N(0, 0.5^2)
    x_t = torch.linspace(-1, 1, 7, dtype=torch.float64)[:, None]
    t = torch.full((7,), 0.9, dtype=torch.float64)
    c, si = math.cos(0.9), math.sin(0.9)
    expect = c * s**2 / (c**2 * s**2 + si**2 * sd**2) * x_t
    torch.testing.assert_close(mix.denoise_trigflow(x_t, t, sd), expect)
    torch.testing.assert_close(mix.velocity_trigflow(x_t, t, sd), (c * x_t - expect) / si)


def test_gmm_bad_arguments():
    with pytest.raises(ValueError, match=r"\[K, D\]"):
        GaussianMixture([0.0, 1.0], stds=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        GaussianMixture([[0.0]])
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture([[0.0, 0.0]], covs=[[[1.0, 0.0], [0.0, -1.0]]])
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([[0.0], [1.0]], stds=0.1, weights=[1.0])
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        gmm_preset("ring8").score(torch.zeros(3, 3), 0.1)
    with pytest.raises(ValueError, match="sigma"):
        gmm_preset("ring8").score(torch.zeros(3, 2), torch.ones(4))


def test_load_gmm_dataset():
    ds = load_dataset("gmm", preset="aniso", n=500, seed=3)
    assert isinstance(ds, Dataset) and len(ds) == 500 and ds.x.dtype == torch.float32
    assert ds.spec == DataSpec("vector", (2,), 0, "gmm-aniso") and ds.y is None and ds.mixture is not None
    assert torch.equal(ds.x, load_dataset("gmm", preset="aniso", n=500, seed=3).x)
    assert not torch.equal(ds.x, load_dataset("gmm", preset="aniso", n=500, seed=4).x)
    assert not torch.equal(ds.x, load_dataset("gmm", preset="aniso", n=500, seed=3, split="test").x)
    cond = load_dataset("gmm", preset="ring8", n=100, conditional=True)
    assert cond.spec.num_classes == 8 and cond.y.dtype == torch.int64 and int(cond.y.max()) < 8


# ----------------------------------------------------------------------------------------- batches
def test_batches_cover_every_sample_each_epoch():
    ds = Dataset(torch.arange(10, dtype=torch.float32)[:, None], torch.arange(10), DataSpec("vector", (1,), 10, "t"))
    it = ds.batches(4, _gen(0))
    seen = torch.cat([next(it)[1] for _ in range(5)])  # 20 samples = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    x, y = next(it)
    assert x.shape == (4, 1) and torch.equal(x[:, 0].long(), y)
    epoch = list(ds.batches(4, _gen(1), infinite=False))
    assert [len(b[0]) for b in epoch] == [4, 4, 2]
    assert sorted(torch.cat([b[1] for b in epoch]).tolist()) == list(range(10))
    a = [b[1] for b in ds.batches(3, _gen(7), infinite=False)]
    b = [b[1] for b in ds.batches(3, _gen(7), infinite=False)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    with pytest.raises(ValueError):
        next(ds.batches(0, _gen(0)))


# ----------------------------------------------------------------------------------------- digits
def test_digits():
    tr, te, al = (load_dataset("digits", split=s) for s in ("train", "test", "all"))
    assert (len(tr), len(te), len(al)) == (1497, 300, 1797)
    assert tr.spec == DataSpec("image", (1, 16, 16), 10, "digits", tuple("0123456789"))
    assert tr.x.dtype == torch.float32 and float(tr.x.min()) == -1.0 and float(tr.x.max()) == 1.0
    assert tr.y.dtype == torch.int64 and set(tr.y.tolist()) == set(range(10)) and set(te.y.tolist()) == set(range(10))
    assert sorted(torch.cat([tr.y, te.y]).tolist()) == sorted(al.y.tolist())
    assert torch.equal(load_dataset("digits", split="test", seed=5).x, te.x)  # the split does not depend on seed
    raw = load_dataset("digits", split="all", resolution=8)
    from sklearn.datasets import load_digits

    ref = torch.from_numpy(load_digits().images).float() / 8.0 - 1.0
    torch.testing.assert_close(raw.x[:, 0], ref)
    assert load_dataset("digits", resolution=32, limit=5).x.shape == (5, 1, 32, 32)


# ----------------------------------------------------------------------------------------- npz
def test_npz_vectors_and_images(tmp_path):
    f = tmp_path / "v.npz"
    np.savez(f, x=np.random.default_rng(0).normal(size=(20, 3)), y=np.arange(20) % 4)
    ds = load_dataset("npz", path=str(f))
    assert ds.spec == DataSpec("vector", (3,), 4, "v") and ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    img = np.zeros((2, 6, 5, 3), dtype=np.uint8)
    img[0, 1, 2] = [0, 128, 255]
    np.savez(tmp_path / "nhwc.npz", x=img)
    ds = load_dataset("npz", path=str(tmp_path / "nhwc.npz"))
    assert ds.spec.kind == "image" and ds.x.shape == (2, 3, 6, 5) and ds.y is None and ds.spec.num_classes == 0
    torch.testing.assert_close(ds.x[0, :, 1, 2], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]))
    np.savez(tmp_path / "nchw.npz", x=np.transpose(img, (0, 3, 1, 2)))
    assert torch.equal(load_dataset("npz", path=str(tmp_path / "nchw.npz")).x, ds.x)
    np.savez(tmp_path / "f.npz", x=np.full((3, 1, 4, 4), 0.25, dtype=np.float32), x_test=np.zeros((1, 1, 4, 4), np.float32))
    assert float(load_dataset("npz", path=str(tmp_path / "f.npz")).x.mean()) == 0.25
    assert len(load_dataset("npz", path=str(tmp_path / "f.npz"), split="test")) == 1
    assert len(load_dataset("npz", path=str(tmp_path / "f.npz"), split="all")) == 4
    assert load_dataset("npz", path=str(tmp_path / "f.npz"), resolution=8).x.shape == (3, 1, 8, 8)


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_dataset("npz", path=str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="path="):
        load_dataset("npz")
    cases = {
        "nox.npz": ({"images": np.zeros((2, 3))}, "no an array 'x'|has no an array|'x'"),
        "ndim.npz": ({"x": np.zeros((2, 3, 4, 5, 6))}, "shape"),
        "range.npz": ({"x": np.full((2, 1, 4, 4), 3.0)}, r"\[-1, 1\]"),
        "ambig.npz": ({"x": np.zeros((2, 3, 4, 3), np.uint8)}, "layout"),
        "labels.npz": ({"x": np.zeros((2, 3)), "y": np.zeros(3, np.int64)}, "labels"),
        "flabels.npz": ({"x": np.zeros((2, 3)), "y": np.array([0.5, 1.0])}, "integers"),
    }
    for name, (arrays, match) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=match):
            load_dataset("npz", path=str(tmp_path / name))
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValueError, match="obj.npz"):
        load_dataset("npz", path=str(tmp_path / "obj.npz"))
    with pytest.raises(ValueError, match="x_test"):
        load_dataset("npz", path=str(tmp_path / "labels.npz"), split="test")


# ----------------------------------------------------------------------------------------- folder
def _png(path: Path, value: int, size=(6, 6), mode="L"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 255)).save(path)


def test_folder_with_and_without_classes(tmp_path):
    for i, cls in enumerate(["cat", "dog", "emu"]):
        for j in range(2):
            _png(tmp_path / "cls" / cls / f"{j}.png", 40 * i)
    ds = load_dataset("folder", path=str(tmp_path / "cls"))
    assert ds.spec == DataSpec("image", (1, 6, 6), 3, "cls", ("cat", "dog", "emu")) and ds.y.tolist() == [0, 0, 1, 1, 2, 2]
    torch.testing.assert_close(ds.x[2, 0, 0, 0], torch.tensor(40 / 127.5 - 1))
    _png(tmp_path / "flat" / "a.png", 255, mode="RGB")
    _png(tmp_path / "flat" / "b.jpg", 0, mode="RGB")
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    ds = load_dataset("folder", path=str(tmp_path / "flat"), resolution=4)
    assert ds.x.shape == (2, 3, 4, 4) and ds.y is None and ds.spec.num_classes == 0
    assert float(ds.x[0, 2].mean()) == pytest.approx(1.0)
    assert load_dataset("folder", path=str(tmp_path / "flat"), channels=1).x.shape == (2, 1, 6, 6)


def test_folder_errors(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        load_dataset("folder", path=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset("folder", path=str(tmp_path / "nowhere"))
    _png(tmp_path / "sizes" / "a.png", 1, size=(6, 6))
    _png(tmp_path / "sizes" / "b.png", 1, size=(8, 6))
    with pytest.raises(ValueError, match=r"b.png' is 8x6, the first image .*a.png.* is 6x6; set data.resolution"):
        load_dataset("folder", path=str(tmp_path / "sizes"))
    assert load_dataset("folder", path=str(tmp_path / "sizes"), resolution=5).x.shape == (2, 1, 5, 5)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="x.png"):
        load_dataset("folder", path=str(tmp_path / "bad"))


# ----------------------------------------------------------------------------------------- cifar10
def _cifar_batch(path: Path, n: int, seed: int):
    """A batch as the CIFAR-10 site ships it: a Python-2 style pickle referencing numpy.core.multiarray."""
    rng = np.random.default_rng(seed)
    d = {b"batch_label": b"synthetic", b"labels": rng.integers(0, 10, n).tolist(),
         b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"filenames": [b"f%d.png" % i for i in range(n)]}
    raw = pickle.dumps(d, protocol=3).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(raw)
    return d


@pytest.fixture
def cifar_dir(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    batches = [_cifar_batch(d / f"data_batch_{i}", 4, i) for i in range(1, 6)]
    batches.append(_cifar_batch(d / "test_batch", 3, 9))
    return d, batches


def test_cifar10_reads_local_batches(cifar_dir):
    d, batches = cifar_dir
    assert b"numpy.core.multiarray" in (d / "test_batch").read_bytes()
    tr = load_dataset("cifar10", path=str(d))
    assert len(tr) == 20 and tr.spec == DataSpec("image", (3, 32, 32), 10, "cifar10", CIFAR_NAMES)
    ref = batches[0][b"data"][1].reshape(3, 32, 32).astype(np.float32) / 127.5 - 1
    torch.testing.assert_close(tr.x[1], torch.from_numpy(ref))
    assert tr.y[:4].tolist() == batches[0][b"labels"]
    te = load_dataset("cifar10", path=str(d.parent), split="test")  # the parent directory works too
    assert len(te) == 3 and te.y.tolist() == batches[5][b"labels"]
    assert len(load_dataset("cifar10", path=str(d), split="all", resolution=16)) == 23


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_cifar10_refuses_anything_but_arrays(cifar_dir, tmp_path):
    d, _ = cifar_dir
    marker = tmp_path / "pwned"
    (d / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": [1]}, protocol=3))
    with pytest.raises(ValueError, match="posix.mkdir|refusing"):
        load_dataset("cifar10", path=str(d), split="test")
    assert not marker.exists()
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [1],
                                                 b"extra": np.float64(1.5)}, protocol=3))
    with pytest.raises(ValueError, match="refusing"):  # numpy scalars need numpy.core.multiarray.scalar: refused
        load_dataset("cifar10", path=str(d), split="test")
    data = (d / "data_batch_2").read_bytes()
    (d / "data_batch_2").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="data_batch_2"):
        load_dataset("cifar10", path=str(d))
    (d / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", path=str(d))
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}, protocol=3))
    with pytest.raises(ValueError, match="3072"):
        load_dataset("cifar10", path=str(d), split="test")


# ----------------------------------------------------------------------------------------- load_dataset
def test_load_dataset_errors():
    with pytest.raises(ValueError, match="valid names: " + ", ".join(DATASETS)):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="val")
    with pytest.raises(ValueError, match="allowed: preset, n, conditional"):
        load_dataset("gmm", presets="ring8")
    with pytest.raises(ValueError, match="preset"):
        load_dataset("gmm", preset="nope")
    with pytest.raises(ValueError, match="resolution"):
        load_dataset("gmm", resolution=8)
