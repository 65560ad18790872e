"""Datasets: gmm (analytic Gaussian mixtures), digits (scikit-learn), npz, folder (Pillow), cifar10 (local batches),
edm (EDM's zip / folder of PNGs with dataset.json), tar (WebDataset-style shards) and prepared (the fast format that
`quickstep-train data` writes: a memory-mappable uint8 array; see `quickstep.train.prepare`).

Every loader returns a `Dataset`: `data` [N, ...] as stored (uint8 images [N, C, H, W] in 0..255, or float32 vectors
[N, D] / float images in [-1, 1]), optional int64 labels `y` [N], and a `DataSpec` describing one sample (with the
class names when the data names its classes).  `Dataset.x` / `Dataset.take(idx)` give float32 in [-1, 1]: images are
kept as uint8 (a quarter of the bytes) and converted per batch.  With `stream=True`, 'edm' and 'tar' return a
`quickstep.train.stream.FileSource` instead (decoded per item by DataLoader workers).  No data is ever downloaded.

`GaussianMixture` is the analytic ground truth of the toy experiments: sampling, log-density, and for the
noised marginal p_sigma = sum_k w_k N(mu_k, Sigma_k + sigma^2 I) the exact score, the exact denoiser
E[x0 | x_sigma] and the log-density (in float64).
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .core.trigflow import SIGMA_DATA, t_to_sigma, x_t_to_x_sigma

DATASETS = ("gmm", "digits", "npz", "folder", "cifar10", "edm", "tar", "prepared")
STREAMED = ("edm", "tar")  # decoded per item by DataLoader workers when the trainer asks for stream=True
SPLITS = ("train", "test", "all")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------- containers
@dataclass(frozen=True)
class DataSpec:
    """What one sample looks like: kind 'image' (shape (C, H, W)) or 'vector' (shape (D,))."""

    kind: Literal["image", "vector"]
    shape: tuple[int, ...]
    num_classes: int  # 0 = unconditional
    name: str
    class_names: tuple[str, ...] | None = None  # index-aligned names of the classes, when the data names them

    def __post_init__(self) -> None:
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"data set {self.name!r}: {len(self.class_names)} class names for {self.num_classes} "
                             f"classes")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": list(self.shape), "num_classes": self.num_classes, "name": self.name,
                "class_names": None if self.class_names is None else list(self.class_names)}


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Stored samples -> float32 model space: uint8 images 0..255 -> [-1, 1] (x / 127.5 - 1); floats unchanged."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(127.5).sub_(1.0)
    return x


@dataclass
class Dataset:
    """An in-memory data set: `data` [N, ...] as stored (uint8 images 0..255, or float32 with images in [-1, 1]),
    y [N] int64 or None, its spec.  `x` is the whole set as float32 in [-1, 1]; `take(idx)` converts only rows.

    `mixture` is the analytic GaussianMixture for `gmm` data (None otherwise)."""

    data: torch.Tensor
    y: torch.Tensor | None
    spec: DataSpec
    mixture: GaussianMixture | None = None

    def __post_init__(self) -> None:
        if self.data.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"data must be uint8 images or float32, got {self.data.dtype}")
        if self.y is not None and self.y.shape != (self.data.shape[0],):
            raise ValueError(f"labels y must have shape [{self.data.shape[0]}], got {list(self.y.shape)}")
        if tuple(self.data.shape[1:]) != tuple(self.spec.shape):
            raise ValueError(f"x has sample shape {tuple(self.data.shape[1:])}, spec says {self.spec.shape}")

    @property
    def x(self) -> torch.Tensor:
        """Every sample as float32 (images in [-1, 1]); a new tensor for uint8 data."""
        return to_unit(self.data)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` as float32 (images in [-1, 1])."""
        return to_unit(self.data[idx])

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with data and y on `device`."""
        y = self.y.to(device) if self.y is not None else None
        return Dataset(self.data.to(device), y, self.spec, self.mixture)

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None, *, infinite: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Shuffled mini-batches (x [B, ...], y [B] or None).

        infinite=True (default): an endless stream; the indices are successive random permutations of
        0..N-1 (every sample is seen once per epoch) cut into batches of exactly `batch_size`, a batch may
        straddle two epochs.  infinite=False: one epoch, the last batch may be smaller."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        if n == 0:
            raise ValueError(f"data set {self.spec.name!r} is empty")
        dev = self.data.device
        if not infinite:
            perm = torch.randperm(n, generator=generator).to(dev)
            for i in range(0, n, batch_size):
                idx = perm[i : i + batch_size]
                yield self.take(idx), (self.y[idx] if self.y is not None else None)
            return
        buf = torch.empty(0, dtype=torch.long)
        while True:
            while buf.numel() < batch_size:
                buf = torch.cat([buf, torch.randperm(n, generator=generator)])
            idx, buf = buf[:batch_size].to(dev), buf[batch_size:]
            yield self.take(idx), (self.y[idx] if self.y is not None else None)


# ----------------------------------------------------------------------------------------------- gaussian mixture
class GaussianMixture:
    """p(x) = sum_k w_k N(x; mu_k, Sigma_k) in D dimensions, with exact quantities of the noised marginal
    p_sigma = p * N(0, sigma^2 I) = sum_k w_k N(mu_k, Sigma_k + sigma^2 I).

    Computations run in float64 through the eigendecomposition Sigma_k = U_k diag(lam_k) U_k^T, so
    Sigma_k + sigma^2 I = U_k diag(lam_k + sigma^2) U_k^T for any per-sample sigma."""

    def __init__(
        self,
        means: torch.Tensor | Sequence,
        covs: torch.Tensor | Sequence | None = None,
        weights: torch.Tensor | Sequence | None = None,
        *,
        stds: torch.Tensor | Sequence | float | None = None,
    ):
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.ndim != 2:
            raise ValueError(f"means must have shape [K, D], got {list(mu.shape)}")
        k, d = mu.shape
        if (covs is None) == (stds is None):
            raise ValueError("give exactly one of covs [K, D, D] and stds (scalar, [K] or [K, D])")
        if covs is not None:
            cov = torch.as_tensor(covs, dtype=torch.float64)
            if cov.shape != (k, d, d):
                raise ValueError(f"covs must have shape [K, D, D] = [{k}, {d}, {d}], got {list(cov.shape)}")
            if not torch.allclose(cov, cov.transpose(1, 2), atol=1e-10):
                raise ValueError("covs must be symmetric")
        else:
            s = torch.as_tensor(stds, dtype=torch.float64)
            if s.ndim == 0:
                s = s.expand(k)
            if s.ndim == 1:
                if s.shape[0] != k:
                    raise ValueError(f"stds of shape [K] needs K = {k}, got {list(s.shape)}")
                s = s[:, None].expand(k, d)
            if s.shape != (k, d):
                raise ValueError(f"stds must be a scalar, [K] or [K, D] = [{k}, {d}], got {list(s.shape)}")
            cov = torch.diag_embed(s**2)
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(
            weights, dtype=torch.float64)
        if w.shape != (k,) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be [K] = [{k}] non-negative numbers with a positive sum")
        lam, u = torch.linalg.eigh(cov)  # [K, D], [K, D, D]
        if bool((lam <= 0).any()):
            raise ValueError("every covariance must be positive definite")
        self.means = mu  # [K, D]
        self.covs = cov  # [K, D, D]
        self.weights = w / w.sum()  # [K]
        self._lam = lam  # [K, D]
        self._u = u  # [K, D, D], columns are eigenvectors
        self._chol = torch.linalg.cholesky(cov)  # [K, D, D]

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    def mean(self) -> torch.Tensor:
        """E[x]  [D] (float64)."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Cov[x]  [D, D] (float64): sum_k w_k (Sigma_k + mu_k mu_k^T) - m m^T."""
        m = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        return second - m[:, None] * m[None, :]

    def sample(
        self, n: int, generator: torch.Generator | None = None, *, return_labels: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """n samples [n, D] (and their component indices [n] int64 if return_labels)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # [n]
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)  # [n, D]
        x = self.means[comp] + torch.einsum("nij,nj->ni", self._chol[comp], z)
        x = x.to(dtype)
        return (x, comp) if return_labels else x

    # -- noised marginal -----------------------------------------------------------------------
    def _sigma2(self, sigma: torch.Tensor | float, n: int) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64)
        if s.ndim == 0:
            s = s.expand(n)
        if s.shape != (n,):
            raise ValueError(f"sigma must be a float or a [n] = [{n}] tensor, got shape {list(s.shape)}")
        return (s**2)[:, None, None]  # [n, 1, 1]

    def _parts(self, x: torch.Tensor, sigma: torch.Tensor | float):
        """Eigen-coordinates r_U = U^T (x - mu) [n, K, D], variances lam + sigma^2 [n, K, D], log N [n, K]."""
        x = torch.as_tensor(x).to(torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [n, {self.dim}], got {list(x.shape)}")
        var = self._lam[None] + self._sigma2(sigma, x.shape[0])  # [n, K, D]
        r = x[:, None, :] - self.means[None]  # [n, K, D]
        ru = torch.einsum("nkd,kde->nke", r, self._u)  # [n, K, D]
        log_n = -0.5 * ((ru**2 / var).sum(-1) + torch.log(var).sum(-1) + self.dim * math.log(2 * math.pi))
        return ru, var, log_n

    def log_prob_sigma(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """log p_sigma(x)  [n] (float64)."""
        _, _, log_n = self._parts(x, sigma)
        return torch.logsumexp(torch.log(self.weights)[None] + log_n, dim=1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x)  [n] (float64)."""
        return self.log_prob_sigma(x, 0.0)

    def responsibilities(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Posterior component probabilities p(k | x_sigma)  [n, K]."""
        _, _, log_n = self._parts(x, sigma)
        return torch.softmax(torch.log(self.weights)[None] + log_n, dim=1)

    def score(self, x_sigma: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Exact grad_x log p_sigma(x) = -sum_k gamma_k (Sigma_k + sigma^2 I)^-1 (x - mu_k)  [n, D], x's dtype."""
        ru, var, log_n = self._parts(x_sigma, sigma)
        gamma = torch.softmax(torch.log(self.weights)[None] + log_n, dim=1)  # [n, K]
        per_k = -torch.einsum("kde,nke->nkd", self._u, ru / var)  # [n, K, D]
        return (gamma[:, :, None] * per_k).sum(1).to(_out_dtype(x_sigma))

    def denoise(self, x_sigma: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Exact E[x0 | x_sigma] = sum_k gamma_k (mu_k + Sigma_k (Sigma_k + sigma^2 I)^-1 (x - mu_k))  [n, D]
        (posterior mean of each Gaussian component; equals Tweedie's x + sigma^2 score)."""
        ru, var, log_n = self._parts(x_sigma, sigma)
        gamma = torch.softmax(torch.log(self.weights)[None] + log_n, dim=1)  # [n, K]
        shrink = self._lam[None] / var  # [n, K, D]
        post = self.means[None] + torch.einsum("kde,nke->nkd", self._u, shrink * ru)  # [n, K, D]
        return (gamma[:, :, None] * post).sum(1).to(_out_dtype(x_sigma))

    # -- TrigFlow view (conversions from train.core) -------------------------------------------
    def denoise_trigflow(self, x_t: torch.Tensor, t: torch.Tensor | float, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
        """Exact x0_hat = E[x0 | x_t] for x_t = cos t x0 + sin t z, z ~ N(0, sigma_d^2 I)  [n, D]."""
        t = torch.as_tensor(t, dtype=torch.float64)
        x64 = torch.as_tensor(x_t).to(torch.float64)
        return self.denoise(x_t_to_x_sigma(x64, t), t_to_sigma(t, sigma_data)).to(_out_dtype(x_t))

    def velocity_trigflow(self, x_t: torch.Tensor, t: torch.Tensor | float, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
        """Exact PF-ODE velocity dx_t/dt = (cos t x_t - x0_hat) / sin t (= sigma_d F*)  [n, D]."""
        t = torch.as_tensor(t, dtype=torch.float64)
        x64 = torch.as_tensor(x_t).to(torch.float64)
        x0 = self.denoise_trigflow(x64, t, sigma_data)
        tb = t[:, None] if t.ndim == 1 else t
        return ((torch.cos(tb) * x64 - x0) / torch.sin(tb)).to(_out_dtype(x_t))


def _out_dtype(x: Any) -> torch.dtype:
    return x.dtype if isinstance(x, torch.Tensor) and x.is_floating_point() else torch.float64


def _rotation(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def _aniso() -> GaussianMixture:
    means = [[-0.6, -0.4], [0.6, -0.2], [0.0, 0.7]]
    axes = [(0.35, 0.06, 0.5), (0.25, 0.08, -1.0), (0.4, 0.1, 0.0)]  # (std major, std minor, angle)
    covs = []
    for a, b, ang in axes:
        r = _rotation(ang)
        covs.append(r @ torch.diag(torch.tensor([a * a, b * b], dtype=torch.float64)) @ r.T)
    return GaussianMixture(means, torch.stack(covs), [0.4, 0.35, 0.25])


GMM_PRESETS: dict[str, str] = {
    "ring8": "2-D: 8 isotropic components (std 0.1) evenly on the unit circle, equal weights",
    "aniso": "2-D: 3 anisotropic full-covariance components, unequal weights",
    "gauss2d": "2-D: one Gaussian N(0, 0.5^2 I)",
    "gauss1d": "1-D: one Gaussian N(0, 0.5^2)",
    "bimodal1d": "1-D: 0.5 N(-0.6, 0.15^2) + 0.5 N(0.6, 0.15^2)",
}


def gmm_preset(name: str) -> GaussianMixture:
    """A named Gaussian mixture (see GMM_PRESETS)."""
    if name == "ring8":
        ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        return GaussianMixture(torch.stack([torch.cos(ang), torch.sin(ang)], 1), stds=0.1)
    if name == "aniso":
        return _aniso()
    if name == "gauss2d":
        return GaussianMixture([[0.0, 0.0]], stds=0.5)
    if name == "gauss1d":
        return GaussianMixture([[0.0]], stds=0.5)
    if name == "bimodal1d":
        return GaussianMixture([[-0.6], [0.6]], stds=0.15)
    raise ValueError(f"unknown gmm preset {name!r}; valid presets: {', '.join(GMM_PRESETS)}")


# ----------------------------------------------------------------------------------------------- helpers
def _check_options(name: str, options: dict[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for dataset {name!r}; "
                         f"allowed: {', '.join(allowed) if allowed else '(none)'}")


def _require_path(name: str, path: str | None, what: str) -> Path:
    if path is None:
        raise ValueError(f"dataset {name!r} needs path= ({what})")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"dataset {name!r}: {str(p)!r} does not exist (expected {what})")
    return p


def _resize(x: torch.Tensor, resolution: int | None, crop: str = "none") -> torch.Tensor:
    """Images [N, C, H, W] center-cropped to a square (crop='center') and resized to resolution x resolution
    (bilinear, antialiased when shrinking).  uint8 stays uint8 (resized in float, rounded back)."""
    if crop == "center" and x.shape[-1] != x.shape[-2]:
        h, w = x.shape[-2:]
        s = min(h, w)
        x = x[..., (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    if resolution is None or tuple(x.shape[-2:]) == (resolution, resolution):
        return x
    if resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution}")
    shrink = resolution < min(x.shape[-2:])
    out = F.interpolate(x.float(), size=(resolution, resolution), mode="bilinear", align_corners=False,
                        antialias=shrink)
    return out.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else out


def _images_stored(arr: np.ndarray, source: str) -> torch.Tensor:
    """Images as stored in memory: uint8 0..255 stays uint8; floats must already lie in [-1, 1] (float32)."""
    if arr.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(arr))
    if np.issubdtype(arr.dtype, np.floating):
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if x.numel() and (float(x.min()) < -1.0 - 1e-3 or float(x.max()) > 1.0 + 1e-3):
            raise ValueError(f"{source}: float images must lie in [-1, 1], found [{float(x.min()):.3g}, "
                             f"{float(x.max()):.3g}]; rescale them (or store uint8 0..255)")
        return x
    raise ValueError(f"{source}: images must be uint8 (0..255) or float in [-1, 1], got dtype {arr.dtype}")


def _labels(y: Any, n: int, source: str) -> torch.Tensor:
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"{source}: labels y must have shape [{n}] (one per sample), got {list(y.shape)}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.equal(np.mod(y, 1), 0)):
            y = y.astype(np.int64)
        else:
            raise ValueError(f"{source}: labels y must be integers, got dtype {y.dtype}")
    if y.size and int(y.min()) < 0:
        raise ValueError(f"{source}: labels y must be >= 0, found {int(y.min())}")
    return torch.from_numpy(y.astype(np.int64))


def _limit(ds: Dataset, limit: int | None) -> Dataset:
    if limit is None:
        return ds
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return Dataset(ds.data[:limit], ds.y[:limit] if ds.y is not None else None, ds.spec, ds.mixture)


# ----------------------------------------------------------------------------------------------- loaders
def _load_gmm(seed: int, split: str, preset: str = "ring8", n: int = 10_000, conditional: bool = False) -> Dataset:
    mix = gmm_preset(preset)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed * 2 + (1 if split == "test" else 0))
    x, comp = mix.sample(n, g, return_labels=True)
    spec = DataSpec("vector", (mix.dim,), mix.num_components if conditional else 0, f"gmm-{preset}")
    return Dataset(x, comp if conditional else None, spec, mix)


DIGITS_TEST_SIZE = 300
DIGIT_NAMES = tuple(str(i) for i in range(10))
DIGITS_SPLIT_SEED = 20250101  # fixed: the test split never depends on the run's seed


def _load_digits(split: str, resolution: int | None) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install 'quickstep[train]'") from e
    bunch = load_digits()
    imgs = torch.from_numpy(bunch.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]  # [1797, 1, 8, 8]
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    perm = torch.from_numpy(np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels)))
    idx = {"test": perm[:DIGITS_TEST_SIZE], "train": perm[DIGITS_TEST_SIZE:], "all": torch.arange(len(labels))}[split]
    x = _resize(imgs[idx], 16 if resolution is None else resolution).clamp(-1.0, 1.0).contiguous()
    return Dataset(x, labels[idx], DataSpec("image", tuple(x.shape[1:]), 10, "digits", DIGIT_NAMES))


def _layout(shape: tuple[int, ...], layout: str | None, source: str) -> str:
    if layout is not None:
        if layout not in ("nchw", "nhwc"):
            raise ValueError(f"layout must be 'nchw' or 'nhwc', got {layout!r}")
        return layout
    first, last = shape[1] <= 4, shape[3] <= 4
    if first != last:
        return "nchw" if first else "nhwc"
    if first and last:  # tiny images: prefer the usual channel counts, then square images
        first, last = shape[1] in (1, 3), shape[3] in (1, 3)
        if first != last:
            return "nchw" if first else "nhwc"
        if (shape[2] == shape[3]) != (shape[1] == shape[2]):
            return "nchw" if shape[2] == shape[3] else "nhwc"
    raise ValueError(f"{source}: cannot tell whether x of shape {list(shape)} is [N, C, H, W] or [N, H, W, C] "
                     f"(channels must be 1..4); pass layout='nchw' or layout='nhwc'")


def _read_npz(arrays: Any, split: str, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The arrays of `split` from an open NpzFile: (x, y or None)."""
    with arrays:
        keys = list(arrays.keys())
        xk, yk = ("x_test", "y_test") if split == "test" else ("x", "y")
        if xk not in keys:
            want = "an array 'x_test' for split='test'" if split == "test" else "an array 'x'"
            raise ValueError(f"npz dataset: {str(path)!r} has no {want}; it holds {keys}")
        x = arrays[xk]
        y = arrays[yk] if yk in keys else None
        if split == "all" and "x_test" in keys:
            x = np.concatenate([x, arrays["x_test"]])
            y = np.concatenate([y, arrays["y_test"]]) if y is not None and "y_test" in keys else None
    return x, y


def _load_npz(path: Path, split: str, resolution: int | None, layout: str | None = None,
              num_classes: int | None = None, crop: str = "none") -> Dataset:
    if path.is_dir():
        raise ValueError(f"npz dataset: {str(path)!r} is a directory; expected an .npz file with an array 'x'")
    try:
        arrays = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"npz dataset: {str(path)!r} is not a readable .npz file of plain arrays ({e})") from e
    try:
        x, y = _read_npz(arrays, split, path)
    except (ValueError, OSError) as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"npz dataset: {str(path)!r} holds arrays that cannot be read ({e}); "
                         f"expected plain numeric arrays (no pickled objects)") from e
    source = f"npz dataset {str(path)!r}"
    if x.ndim == 2:
        if not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"{source}: x must be numeric, got dtype {x.dtype}")
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        kind: Literal["image", "vector"] = "vector"
    elif x.ndim in (3, 4):
        if x.ndim == 3:
            x = x[:, None]  # [N, H, W] -> [N, 1, H, W]
        elif _layout(x.shape, layout, source) == "nhwc":
            x = np.transpose(x, (0, 3, 1, 2))
        xt = _resize(_images_stored(x, source), resolution, crop).contiguous()
        kind = "image"
    else:
        raise ValueError(f"{source}: x must be [N, D] (vectors) or [N, C, H, W] / [N, H, W, C] / [N, H, W] "
                         f"(images), got shape {list(x.shape)}")
    if xt.shape[0] == 0:
        raise ValueError(f"{source}: x holds no samples")
    yt = _labels(y, xt.shape[0], source) if y is not None else None
    nc = 0 if yt is None else (int(num_classes) if num_classes is not None else int(yt.max()) + 1)
    if yt is not None and int(yt.max()) >= nc:
        raise ValueError(f"{source}: label {int(yt.max())} out of range for num_classes={nc}")
    return Dataset(xt, yt, DataSpec(kind, tuple(xt.shape[1:]), nc, path.stem))


def _load_folder(path: Path, resolution: int | None, channels: int | None = None, crop: str = "none") -> Dataset:
    from .sources import FileSource

    return FileSource("folder", path, resolution=resolution, crop=crop, channels=channels).materialize()


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except what a numpy array needs (CIFAR-10 batches hold dicts, lists, bytes, arrays)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays, lists, dicts and bytes are allowed")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return np.ndarray if name == "ndarray" else np.dtype


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (uint8 images [N, 3, 32, 32], int64 labels [N]), never unpickling code."""
    try:
        with open(path, "rb") as f:
            d = _ArraysOnlyUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"cifar10 batch {str(path)!r}: {e}") from e
    except (EOFError, ValueError, TypeError, IndexError, KeyError) as e:
        raise ValueError(f"cifar10 batch {str(path)!r} is truncated or not a CIFAR-10 python batch ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"cifar10 batch {str(path)!r} holds a {type(d).__name__}, expected a dict with data/labels")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise ValueError(f"cifar10 batch {str(path)!r} has keys {sorted(map(str, d))}; expected 'data' and 'labels'")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        raise ValueError(f"cifar10 batch {str(path)!r}: 'data' must be uint8 [N, 3072], got {type(data).__name__} "
                         f"{getattr(data, 'dtype', '')} {list(shape) if shape is not None else ''}")
    labels = np.asarray(d["labels"], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise ValueError(f"cifar10 batch {str(path)!r}: {len(labels)} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), labels


CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_TEST = ("test_batch",)


def _load_cifar10(path: Path, split: str, resolution: int | None, crop: str = "none") -> Dataset:
    if not path.is_dir():
        raise ValueError(f"cifar10 dataset: {str(path)!r} is not a directory; expected the python batch "
                         f"directory (cifar-10-batches-py) with {', '.join(CIFAR_TRAIN + CIFAR_TEST)}")
    if not (path / "test_batch").exists() and (path / "cifar-10-batches-py").is_dir():
        path = path / "cifar-10-batches-py"
    names = {"train": CIFAR_TRAIN, "test": CIFAR_TEST, "all": CIFAR_TRAIN + CIFAR_TEST}[split]
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"cifar10 dataset: {str(path)!r} lacks {missing}; split={split!r} needs {list(names)}")
    parts = [read_cifar_batch(path / n) for n in names]
    x = _resize(torch.from_numpy(np.concatenate([p[0] for p in parts])), resolution, crop).contiguous()
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    if int(y.min()) < 0 or int(y.max()) > 9:
        raise ValueError(f"cifar10 dataset {str(path)!r}: labels must be 0..9, found {int(y.min())}..{int(y.max())}")
    return Dataset(x, y, DataSpec("image", tuple(x.shape[1:]), 10, "cifar10", CIFAR_NAMES))


def load_dataset(
    name: str,
    *,
    path: str | None = None,
    split: str = "train",
    seed: int = 0,
    resolution: int | None = None,
    crop: str = "none",
    stream: bool = False,
    **options: Any,
) -> Any:
    """Load a data set by name: 'gmm', 'digits', 'npz', 'folder', 'cifar10', 'edm', 'tar' or 'prepared'.

    Options: gmm: preset (GMM_PRESETS), n (samples, default 10000), conditional (labels = component);
    npz: layout ('nchw' | 'nhwc', for ambiguous 4-D arrays), num_classes; folder: channels (1 | 3);
    edm / tar: channels, num_classes; prepared: verify_source (default true: refuse a cache whose source changed);
    every data set: limit (keep the first `limit` samples).
    Splits: gmm draws 'train' and 'test' from different seeds; digits has a fixed 1497/300 train/test split;
    npz 'test' reads arrays x_test/y_test; cifar10 reads data_batch_1..5 / test_batch; folder, edm, tar and
    prepared have one split.  `resolution` resizes images (digits default 16), `crop='center'` first crops them to
    a centered square.  `stream=True` returns a `sources.FileSource` (decoded per item) for 'edm' and 'tar', an
    in-memory `Dataset` otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if crop not in ("none", "center"):
        raise ValueError(f"crop must be 'none' or 'center', got {crop!r}")
    limit = options.pop("limit", None)
    if name in ("folder", "edm", "tar", "prepared") and split == "test":
        raise ValueError(f"{name} dataset has a single split; use split='train' or 'all'")
    if name == "gmm":
        _check_options(name, options, ("preset", "n", "conditional"))
        if resolution is not None:
            raise ValueError("resolution applies to image data sets only, not to 'gmm'")
        ds = _load_gmm(seed, split, **options)
    elif name == "digits":
        _check_options(name, options, ())
        ds = _load_digits(split, resolution)
    elif name == "npz":
        _check_options(name, options, ("layout", "num_classes"))
        ds = _load_npz(_require_path(name, path, "an .npz file with an array 'x'"), split, resolution, crop=crop,
                       **options)
    elif name == "folder":
        _check_options(name, options, ("channels",))
        ds = _load_folder(_require_path(name, path, "a directory of images or of class sub-folders"), resolution,
                          crop=crop, **options)
    elif name in STREAMED:
        from .sources import FileSource

        _check_options(name, options, ("channels", "num_classes"))
        what = "an EDM zip or folder of images" if name == "edm" else "a .tar shard or a directory of .tar shards"
        src = FileSource(name, _require_path(name, path, what), resolution=resolution, crop=crop, **options)
        if limit is not None:
            src = src.head(limit)
            limit = None
        ds = src if stream else src.materialize()
    elif name == "prepared":
        from .prepare import load_prepared

        _check_options(name, options, ("verify_source",))
        ds = load_prepared(_require_path(name, path, "a directory written by `quickstep-train data`"),
                           resolution=resolution, crop=crop, **options)
    else:
        _check_options(name, options, ())
        ds = _load_cifar10(_require_path(name, path, "the CIFAR-10 python batch directory"), split, resolution, crop)
    return _limit(ds, limit)


def detect_source(path: str | Path) -> str:
    """The data set name for `--data PATH`: .npz -> npz; .zip -> edm; .tar or a folder of .tar shards -> tar; a
    folder written by `quickstep-train data` -> prepared; a CIFAR-10 batch folder -> cifar10; a folder with EDM's
    dataset.json -> edm; any other folder -> folder (images, or class sub-folders)."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return "npz"
    if suffix == ".zip":
        return "edm"
    if suffix == ".tar":
        return "tar"
    if p.is_dir():
        if (p / "meta.json").is_file() and (p / "images.npy").is_file():
            return "prepared"
        if (p / "data_batch_1").is_file() or (p / "test_batch").is_file() or (p / "cifar-10-batches-py").is_dir():
            return "cifar10"
        if any(c.name.endswith(".tar") for c in p.iterdir()):
            return "tar"
        if (p / "dataset.json").is_file():
            return "edm"
        return "folder"
    if not p.exists():
        raise FileNotFoundError(f"--data {str(p)!r} does not exist")
    raise ValueError(f"--data {str(p)!r}: cannot tell the format; expected an .npz file, an EDM .zip, .tar shards or "
                     f"a directory (images, class sub-folders, EDM, CIFAR-10 batches or `quickstep-train data` output)")


__all__ = [
    "DATASETS",
    "GMM_PRESETS",
    "DataSpec",
    "Dataset",
    "detect_source",
    "to_unit",
    "GaussianMixture",
    "gmm_preset",
    "load_dataset",
    "read_cifar_batch",
]
