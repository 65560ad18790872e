"""PF-ODE NLL of an exact Gaussian model equals the analytic value (nats and bits/dim)."""

from __future__ import annotations

import math

import pytest
import torch
from quickstep.train.data import GaussianMixture
from quickstep.train.eval.gmm_diagnostics import exact_model
from quickstep.train.eval.likelihood import pf_ode_nll

SIGMA_D = 0.5


def _analytic_nll(x: torch.Tensor, s: float, t: float) -> torch.Tensor:
    """x_t = cos t x0 + sin t z with x0 ~ N(0, s^2 I), z ~ N(0, sigma_d^2 I): x_t ~ N(0, v I)."""
    v = math.cos(t) ** 2 * s**2 + math.sin(t) ** 2 * SIGMA_D**2
    x = x.flatten(1).double()
    return 0.5 * (x.square().sum(1) / v + x.shape[1] * math.log(2 * math.pi * v))


@pytest.mark.parametrize("s", [0.3, 1.2])
def test_nll_exact_divergence_matches_gaussian_density(s):
    d = 2
    model = exact_model(GaussianMixture([[0.0] * d], stds=s), sigma_data=SIGMA_D)
    x = torch.randn(64, d, generator=torch.Generator().manual_seed(0)) * s
    t_min = 1e-3
    res = pf_ode_nll(model, x, t_min=t_min, divergence="exact")
    ref = _analytic_nll(x, s, t_min)
    assert res.divergence == "exact" and res.nfe > 10
    torch.testing.assert_close(res.nll, ref, rtol=1e-3, atol=1e-3)
    assert res.bits_per_dim == pytest.approx(float(ref.mean()) / (d * math.log(2)), rel=1e-3)


def test_nll_hutchinson_bits_per_dim_for_images():
    shape = (1, 4, 4)
    d, s = 16, 0.4
    mix = GaussianMixture([[0.0] * d], stds=s)
    model = exact_model(mix, sigma_data=SIGMA_D)

    class ImageView(torch.nn.Module):  # the same exact model seen through image-shaped tensors
        sigma_data = SIGMA_D

        def velocity(self, x, t, class_labels=None):
            return model.velocity(x.flatten(1), t).reshape(x.shape)

    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(1)) * s
    t_min = 1e-3
    res = pf_ode_nll(ImageView(), x, t_min=t_min, divergence="auto", exact_max_dim=4, levels=256)
    ref = _analytic_nll(x, s, t_min)
    assert res.divergence == "hutchinson"  # exact here: the velocity is linear in x, so eps^T A eps = tr A
    torch.testing.assert_close(res.nll, ref, rtol=1e-3, atol=1e-3)
    bpd = (float(ref.mean()) + d * math.log(128)) / (d * math.log(2))
    assert res.bits_per_dim == pytest.approx(bpd, rel=1e-3)


def test_nll_rejects_unknown_divergence():
    model = exact_model(GaussianMixture([[0.0]], stds=0.5))
    with pytest.raises(ValueError, match="divergence must be one of"):
        pf_ode_nll(model, torch.zeros(2, 1), divergence="magic")
