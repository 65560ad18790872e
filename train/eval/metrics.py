"""Sample-quality metrics in a feature space, and distances between point clouds.

- Frechet distance (FD; Heusel et al. 2017, "FID" with Inception features): ||mu_a - mu_b||^2 +
  tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), computed in float64 through symmetric eigendecompositions.
- KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3,
  averaged over random subsets (mean and std reported); optionally on features normalised by the reference RMS
  (for feature spaces other than Inception's, whose scale the kernel does not expect).
- Precision / recall with k-NN manifolds (Kynkaanniemi et al. 2019).
- For low-dimensional samples: sliced Wasserstein-2 and the RBF-kernel MMD^2.
Feature extractors live in `classifier.py` (digits) and `inception.py` (CIFAR-10/ImageNet).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _as_2d(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu().to(torch.float64)
    if t.ndim != 2 or t.shape[0] < 2:
        raise ValueError(f"{name} must be a [N >= 2, D] array of features, got shape {list(t.shape)}")
    return t


# ----------------------------------------------------------------------------------------------- Frechet distance
@dataclass(frozen=True)
class GaussianStats:
    """Mean [D] and covariance [D, D] (float64) of a feature set; what FID caches for the reference set."""

    mu: torch.Tensor
    cov: torch.Tensor

    @staticmethod
    def of(features: torch.Tensor | np.ndarray) -> GaussianStats:
        """Sample mean and unbiased covariance of features [N, D]."""
        f = _as_2d(features, "features")
        mu = f.mean(0)
        c = f - mu
        return GaussianStats(mu, c.T @ c / (f.shape[0] - 1))


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    lam, u = torch.linalg.eigh((a + a.T) / 2)
    return (u * lam.clamp_min(0).sqrt()) @ u.T


def frechet_distance_from_stats(a: GaussianStats, b: GaussianStats) -> float:
    """FD between N(mu_a, C_a) and N(mu_b, C_b): ||mu_a - mu_b||^2 + tr C_a + tr C_b - 2 tr (C_a^1/2 C_b C_a^1/2)^1/2."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    s = _sqrtm_psd(a.cov)
    m = s @ b.cov @ s  # symmetric PSD, same non-zero spectrum as C_a C_b
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    d = float((a.mu - b.mu).square().sum() + torch.trace(a.cov) + torch.trace(b.cov) - 2 * tr_sqrt)
    return max(d, 0.0)


def frechet_distance(feat_a: torch.Tensor | np.ndarray, feat_b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between the Gaussian fits of two feature sets [N, D] and [M, D] (FID's formula)."""
    return frechet_distance_from_stats(GaussianStats.of(feat_a), GaussianStats.of(feat_b))


# ----------------------------------------------------------------------------------------------- KID
def _poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor) -> float:
    """Unbiased MMD^2 from kernel matrices (diagonals of kxx, kyy excluded)."""
    m, n = kxx.shape[0], kyy.shape[0]
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


def kid(feat_a: torch.Tensor | np.ndarray, feat_b: torch.Tensor | np.ndarray, *, subsets: int = 100,
        subset_size: int = 1000, generator: torch.Generator | None = None,
        normalize: bool = False) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) over `subsets` random subsets of the unbiased polynomial MMD^2.

    The kernel (x.y / d + 1)^3 assumes features of order one per dimension, as Inception pool3 features are. For
    other feature spaces pass `normalize=True`: both sets are divided by the RMS of the reference set `feat_b`
    (one scalar), which makes KID invariant to the feature scale."""
    a, b = _as_2d(feat_a, "feat_a"), _as_2d(feat_b, "feat_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if normalize:
        rms = b.pow(2).mean().sqrt().clamp_min(1e-12)
        a, b = a / rms, b / rms
    m = min(subset_size, a.shape[0], b.shape[0])
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    vals = []
    for _ in range(subsets):
        x = a[torch.randperm(a.shape[0], generator=g)[:m]]
        y = b[torch.randperm(b.shape[0], generator=g)[:m]]
        vals.append(mmd2_unbiased(_poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)))
    v = torch.tensor(vals, dtype=torch.float64)
    return float(v.mean()), float(v.std()) if len(vals) > 1 else 0.0


# ----------------------------------------------------------------------------------------------- precision/recall
def _knn_radii(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance of each row of x to its k-th nearest other row [N]."""
    out = []
    for i in range(0, x.shape[0], chunk):
        d = torch.cdist(x[i : i + chunk], x)  # [c, N]
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself at distance 0
    return torch.cat(out)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> float:
    inside = []
    for i in range(0, points.shape[0], chunk):
        d = torch.cdist(points[i : i + chunk], centres)  # [c, M]
        inside.append((d <= radii[None, :]).any(1))
    return float(torch.cat(inside).float().mean())


def precision_recall(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): the fraction of fake samples inside the real
    k-NN manifold, and of real samples inside the fake one."""
    r, f = _as_2d(real, "real"), _as_2d(fake, "fake")
    if k < 1 or k >= min(r.shape[0], f.shape[0]):
        raise ValueError(f"k must be in [1, {min(r.shape[0], f.shape[0]) - 1}], got {k}")
    precision = _coverage(f, r, _knn_radii(r, k))
    recall = _coverage(r, f, _knn_radii(f, k))
    return precision, recall


# ----------------------------------------------------------------------------------------------- low-dim distances
def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, *, projections: int = 256,
                       generator: torch.Generator | None = None, p: int = 2) -> float:
    """Sliced Wasserstein-p distance (E_theta W_p^p(theta.a, theta.b))^(1/p) between point clouds of equal size
    (p = 2 default; p = 1 is the sliced W1 of issue 17)."""
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    x, y = _as_2d(a, "a"), _as_2d(b, "b")
    n = min(x.shape[0], y.shape[0])
    x, y = x[:n], y[:n]
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    theta = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)  # [D, P] unit directions
    px, _ = torch.sort(x @ theta, dim=0)
    py, _ = torch.sort(y @ theta, dim=0)
    if p == 1:
        return float((px - py).abs().mean())
    return float((px - py).square().mean().sqrt())


def mmd_rbf(a: torch.Tensor, b: torch.Tensor, *, bandwidths: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)) -> float:
    """Unbiased MMD^2 with a sum of RBF kernels exp(-||x - y||^2 / (2 h^2)) over `bandwidths`."""
    x, y = _as_2d(a, "a"), _as_2d(b, "b")

    def k(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        d2 = torch.cdist(p, q).square()
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    return mmd2_unbiased(k(x, x), k(y, y), k(x, y))


__all__ = [
    "GaussianStats",
    "frechet_distance",
    "frechet_distance_from_stats",
    "kid",
    "mmd2_unbiased",
    "mmd_rbf",
    "precision_recall",
    "sliced_wasserstein",
]
