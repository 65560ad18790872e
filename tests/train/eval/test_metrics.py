"""FD, KID, precision/recall, sliced W2 and MMD on cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from quickstep.train.eval.metrics import (
    GaussianStats,
    frechet_distance,
    frechet_distance_from_stats,
    kid,
    mmd_rbf,
    precision_recall,
    sliced_wasserstein,
)
from scipy import linalg


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_fd_from_exact_stats_matches_closed_form_with_non_commuting_covariances():
    g = _gen()
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(6, 6, generator=g, dtype=torch.float64)
    ca, cb = a @ a.T + 0.1 * torch.eye(6), b @ b.T + 0.1 * torch.eye(6)
    mu_a, mu_b = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    ref = float((mu_a - mu_b).square().sum()) + float(np.trace(ca.numpy() + cb.numpy()
                                                               - 2 * linalg.sqrtm(ca.numpy() @ cb.numpy()).real))
    got = frechet_distance_from_stats(GaussianStats(mu_a, ca), GaussianStats(mu_b, cb))
    assert got == pytest.approx(ref, rel=1e-8)
    assert frechet_distance_from_stats(GaussianStats(mu_a, ca), GaussianStats(mu_a, ca)) == pytest.approx(0, abs=1e-9)


def test_fd_of_gaussian_samples_self_zero_and_shifted_equals_closed_form():
    g = _gen(1)
    n, d = 20000, 8
    std_a = torch.linspace(0.5, 1.5, d, dtype=torch.float64)
    std_b = torch.linspace(1.0, 2.0, d, dtype=torch.float64)
    shift = torch.full((d,), 0.5, dtype=torch.float64)
    xa = torch.randn(n, d, generator=g, dtype=torch.float64) * std_a
    xb = torch.randn(n, d, generator=g, dtype=torch.float64) * std_b + shift
    assert frechet_distance(xa, xa) == pytest.approx(0.0, abs=1e-8)
    closed = float(shift.square().sum() + (std_a - std_b).square().sum())  # diagonal covariances
    assert frechet_distance(xa, xb) == pytest.approx(closed, rel=0.03)
    # two independent samples of the same Gaussian: only the O(d^2 / n) estimation bias remains
    xa2 = torch.randn(n, d, generator=g, dtype=torch.float64) * std_a
    assert frechet_distance(xa, xa2) < 0.01 * closed


def test_fd_rejects_bad_shapes():
    with pytest.raises(ValueError, match="features"):
        frechet_distance(torch.zeros(10), torch.zeros(10, 2))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(torch.randn(10, 2), torch.randn(10, 3))


def test_kid_zero_for_same_distribution_positive_for_shift():
    g = _gen(2)
    a = torch.randn(1000, 16, generator=g)
    b = torch.randn(1000, 16, generator=g)
    c = torch.randn(1000, 16, generator=g) + 0.5
    same, same_std = kid(a, b, subsets=20, subset_size=500, generator=_gen(3))
    diff, _ = kid(a, c, subsets=20, subset_size=500, generator=_gen(3))
    assert abs(same) < 3 * same_std + 1e-3
    assert diff > 20 * max(same_std, 1e-4)


def test_kid_normalized_is_scale_invariant():
    """With normalize=True, multiplying both feature sets by 1000 leaves KID unchanged (raw KID explodes)."""
    g = _gen(5)
    a = torch.randn(600, 32, generator=g).abs()
    c = torch.randn(600, 32, generator=g).abs() + 0.3
    unit = kid(a, c, subsets=10, subset_size=300, generator=_gen(6), normalize=True)
    big = kid(a * 1000, c * 1000, subsets=10, subset_size=300, generator=_gen(6), normalize=True)
    assert big == pytest.approx(unit, rel=1e-6)
    assert unit[0] > 5 * unit[1] > 0
    raw_big = kid(a * 1000, c * 1000, subsets=10, subset_size=300, generator=_gen(6))
    assert abs(raw_big[0]) > 1e6 * abs(unit[0])


def test_precision_recall_detects_mode_dropping():
    g = _gen(4)
    real = torch.cat([torch.randn(500, 2, generator=g) * 0.1 + torch.tensor([2.0, 0.0]),
                      torch.randn(500, 2, generator=g) * 0.1 - torch.tensor([2.0, 0.0])])
    fake_all = torch.cat([torch.randn(500, 2, generator=g) * 0.1 + torch.tensor([2.0, 0.0]),
                          torch.randn(500, 2, generator=g) * 0.1 - torch.tensor([2.0, 0.0])])
    fake_one = torch.randn(1000, 2, generator=g) * 0.1 + torch.tensor([2.0, 0.0])  # drops a mode
    p, r = precision_recall(real, fake_all)
    assert p > 0.9 and r > 0.9
    p1, r1 = precision_recall(real, fake_one)
    assert p1 > 0.9 and r1 < 0.6


def test_sliced_wasserstein_of_a_shift_and_mmd():
    g = _gen(5)
    a = torch.randn(2000, 2, generator=g, dtype=torch.float64)
    # W2 of a shift by m along every projection theta is |theta.m|: SW^2 = E (theta.m)^2 = |m|^2 / D
    m = torch.tensor([1.0, 0.0], dtype=torch.float64)
    sw = sliced_wasserstein(a, a + m, projections=500, generator=_gen(6))
    assert sw == pytest.approx(math.sqrt(0.5), rel=0.05)
    b = torch.randn(2000, 2, generator=g, dtype=torch.float64)
    assert abs(mmd_rbf(a[:1000], b[:1000])) < 5e-3
    assert mmd_rbf(a[:1000], b[:1000] + 0.5) > 0.05
