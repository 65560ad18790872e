"""The exact consistency map Phi* of a Gaussian mixture, against closed forms and a fine fixed-step solve."""

from __future__ import annotations

import math

import pytest
import torch
from quickstep.train.core.sampling import karras_sigmas, sample_heun
from quickstep.train.core.trigflow import x_sigma_to_x_t
from quickstep.train.data import GaussianMixture, gmm_preset
from quickstep.train.eval import gmm_diagnostics as gd

SIGMA_D = 0.5


def _closed_form(mu: torch.Tensor, s: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, sd: float) -> torch.Tensor:
    """Single Gaussian N(mu, diag(s^2)): the PF-ODE keeps (x_sigma - mu) / sqrt(s^2 + sigma^2) constant, so
    Phi*(x_t, t) = mu + (x_t - cos t mu) s / sqrt(s^2 cos^2 t + sd^2 sin^2 t)  (per coordinate)."""
    c, si = torch.cos(t)[:, None], torch.sin(t)[:, None]
    return mu + (x_t - c * mu) * s / torch.sqrt(s**2 * c**2 + sd**2 * si**2)


@pytest.mark.parametrize("sd", [0.5, 1.3])
def test_single_gaussian_map_is_the_closed_form(sd):
    mu = torch.tensor([0.3, -0.7], dtype=torch.float64)
    s = torch.tensor([0.2, 0.9], dtype=torch.float64)
    mix = GaussianMixture(mu[None], stds=s[None])
    g = torch.Generator().manual_seed(0)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 1.56 + 0.004  # (0.004, 1.564)
    x_t = torch.randn(64, 2, generator=g, dtype=torch.float64) * 1.5
    got = gd.exact_consistency_map(mix, x_t, t, sigma_data=sd)
    want = _closed_form(mu, s, x_t, t, sd)
    assert torch.allclose(got, want, rtol=0, atol=1e-8), float((got - want).abs().max())
    # the map is not the identity nor the denoiser: it moves points (sanity of the test itself)
    assert float((want - x_t).abs().max()) > 0.1
    assert float((want - mix.denoise_trigflow(x_t, t, sd)).abs().max()) > 0.1


def test_mixture_map_matches_a_fine_heun_solve():
    """On ring8 the adaptive map agrees with a 2000-step Heun solve of the same exact ODE (float64)."""
    mix = gmm_preset("ring8")
    model = gd.exact_model(mix, sigma_data=SIGMA_D).to(torch.float64)
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(32, 2, generator=g, dtype=torch.float64)
    sigmas = karras_sigmas(2000, sigma_min=1e-4, sigma_max=5.0).to(torch.float64)
    x_sigma = eps * 5.0
    heun = sample_heun(model.denoise, x_sigma, sigmas)
    t = torch.full((32,), math.atan(5.0 / SIGMA_D), dtype=torch.float64)
    got = gd.exact_consistency_map(mix, x_sigma_to_x_t(x_sigma, torch.full((32,), 5.0, dtype=torch.float64),
                                                       SIGMA_D), t, sigma_data=SIGMA_D)
    assert torch.allclose(got, heun, atol=1e-4), float((got - heun).abs().max())
    # the end points sit on the ring (a data mode), far from the noisy start
    assert float((got.norm(dim=1) - 1).abs().max()) < 0.5


def test_map_error_is_zero_for_the_exact_model_and_grows_with_error():
    mix = gmm_preset("aniso")
    probe = gd.ConsistencyMapProbe(mix, sigma_data=SIGMA_D, n=64, bands=(0.01, 0.3, 3.0, 80.0))
    exact = probe(gd.exact_model(mix, sigma_data=SIGMA_D).to(torch.float64))
    assert len(exact) == 3 and all(v.n == 64 for v in exact)
    # the exact diffusion model's one-step map is the denoiser E[x0 | x_t], not Phi*: the probe sees the gap, which
    # vanishes as sigma -> 0 and is large at high noise (the denoiser gives the mean, Phi* a data point)
    assert exact[0].mean < 0.01 * exact[2].mean and exact[2].mean > 0.1
    # a consistency function equal to Phi* itself has zero error in every band
    perfect = probe(lambda x_t, t: gd.exact_consistency_map(mix, x_t, t, sigma_data=SIGMA_D))
    assert max(v.mean for v in perfect) < 1e-12
    off = probe(lambda x_t, t: gd.exact_consistency_map(mix, x_t, t, sigma_data=SIGMA_D) + 0.1)
    assert all(abs(v.mean - 0.02) < 1e-9 for v in off)  # ||(0.1, 0.1)||^2
    scalars = gd.map_error_scalars(off)
    assert set(scalars) == {"map_err/sigma_0.01-0.3", "map_err/sigma_0.3-3", "map_err/sigma_3-80", "map_err/mean"}


def test_map_rejects_bad_input():
    mix = gmm_preset("ring8")
    with pytest.raises(ValueError, match="shape"):
        gd.exact_consistency_map(mix, torch.zeros(3, 3), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="pi/2"):
        gd.exact_consistency_map(mix, torch.zeros(3, 2), torch.full((3,), 1.6))
