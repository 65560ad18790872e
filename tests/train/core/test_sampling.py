"""Samplers against analytic ground truth: Gaussian data N(m, s^2 I), whose PF-ODE is a pure scaling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from quickstep.train.core.sampling import (
    karras_sigmas,
    sample_consistency,
    sample_euler,
    sample_heun,
    sample_sde,
)
from quickstep.train.core.trigflow import SIGMA_DATA, T_MID, consistency_times, t_max

S = 1.7  # data std, as in the issue
SIGMA_MAX = 80.0


def gaussian_denoiser(s: float, mean: float = 0.0):
    """Exact EDM denoiser of N(mean, s^2 I): D(x; sigma) = mean + s^2 / (s^2 + sigma^2) (x - mean)."""

    def D(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sig = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return mean + (s**2 / (s**2 + sig**2)) * (x - mean)

    return D


def exact_pf_ode(x_max: torch.Tensor, s: float, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """x(0) = x(sigma_max) * s / sqrt(s^2 + sigma_max^2)."""
    return x_max * s / math.sqrt(s**2 + sigma_max**2)


def rel_error(sampler, n: int) -> float:
    x = torch.linspace(-2.0, 2.0, 8, dtype=torch.float64).reshape(8, 1) * SIGMA_MAX  # [8, 1]
    out = sampler(gaussian_denoiser(S), x, karras_sigmas(n, sigma_max=SIGMA_MAX))
    exact = exact_pf_ode(x, S)
    return float((out - exact).abs().max() / exact.abs().max())


def order(sampler, ns=(40, 80, 160)) -> tuple[float, list[float]]:
    errs = [rel_error(sampler, n) for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    return float(slope), errs


def test_one_component_gmm_denoiser_is_the_gaussian_posterior_mean():
    """The data module's exact GMM denoiser with one component N(m, s^2) equals the closed form used as ground
    truth in this file, and is the posterior mean: its residual x0 - D(x_sigma) is uncorrelated with functions of
    x_sigma (Monte Carlo, within 5 standard errors)."""
    from quickstep.train.data import GaussianMixture

    mean = 0.3
    mix = GaussianMixture([[mean]], stds=S)
    x = torch.linspace(-6.0, 6.0, 13, dtype=torch.float64)[:, None]  # [13, 1]
    sig = torch.logspace(-2, math.log10(SIGMA_MAX), 13, dtype=torch.float64)  # [13], one sigma per row
    torch.testing.assert_close(mix.denoise(x, sig), gaussian_denoiser(S, mean)(x, sig))

    g = torch.Generator().manual_seed(0)
    n, sigma = 200_000, 1.3
    x0 = mix.sample(n, g, dtype=torch.float64)  # [n, 1]
    xs = x0 + sigma * torch.randn(n, 1, generator=g, dtype=torch.float64)
    resid = (x0 - mix.denoise(xs, sigma))[:, 0]
    for f in (torch.ones_like(xs[:, 0]), xs[:, 0], torch.tanh(xs[:, 0]), xs[:, 0] ** 3):
        prod = resid * f
        assert abs(float(prod.mean())) < 5 * float(prod.std()) / math.sqrt(n)
    wrong = (x0 - mix.denoise(xs, 1.1 * sigma))[:, 0] * xs[:, 0]  # the posterior mean of the wrong noise level
    assert abs(float(wrong.mean())) > 20 * float(wrong.std()) / math.sqrt(n)


def test_karras_sigmas_grid():
    sig = karras_sigmas(18)
    assert sig.shape == (19,)
    assert float(sig[0]) == pytest.approx(80.0)
    assert float(sig[-2]) == pytest.approx(0.002, rel=1e-5)
    assert float(sig[-1]) == 0.0
    assert bool((sig[:-1] > sig[1:]).all())
    with pytest.raises(ValueError):
        karras_sigmas(0)


def test_heun_second_order_and_100_step_error():
    slope, errs = order(sample_heun)
    assert slope >= 1.7, f"Heun order {slope:.2f} (errors {errs})"
    assert rel_error(sample_heun, 100) <= 2e-3
    assert 0.02 < rel_error(sample_heun, 18) < 0.08  # ~4% at 18 steps for s = 1.7 (issue's reference value)


def test_euler_first_order():
    slope, errs = order(sample_euler)
    assert 0.8 <= slope <= 1.3, f"Euler order {slope:.2f} (errors {errs})"
    assert rel_error(sample_euler, 100) > rel_error(sample_heun, 100) * 5


def test_heun_passes_class_labels_and_sigma_per_sample():
    seen = {}

    def D(x, sigma, class_labels):
        seen["labels"], seen["sigma_shape"] = class_labels, tuple(sigma.shape)
        return torch.zeros_like(x)

    labels = torch.tensor([3, 4])
    sample_heun(D, torch.ones(2, 3), karras_sigmas(3), class_labels=labels)
    assert seen["labels"] is labels and seen["sigma_shape"] == (2,)


def test_sde_matches_data_variance():
    """Euler-Maruyama on the exact Gaussian denoiser ends near N(0, s^2)."""
    g = torch.Generator().manual_seed(1)
    x = SIGMA_MAX * torch.randn(20_000, 1, generator=g, dtype=torch.float64)
    out = sample_sde(gaussian_denoiser(S), x, karras_sigmas(200), generator=g)
    assert float(out.std()) == pytest.approx(S, rel=0.05)
    assert abs(float(out.mean())) < 0.05
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = sample_sde(gaussian_denoiser(S), x[:10], karras_sigmas(5), generator=g1)
    b = sample_sde(gaussian_denoiser(S), x[:10], karras_sigmas(5), generator=g2)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------- consistency
MEAN = 0.3


def analytic_consistency(s: float = S, mean: float = MEAN, sigma_d: float = SIGMA_DATA):
    """Exact consistency function of N(mean, s^2 I) in TrigFlow:
    x_t = cos t x0 + sin t z has mean cos t m and std sqrt(cos^2 t s^2 + sin^2 t sigma_d^2)."""

    def f(x_t: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        tb = t.reshape(-1, *([1] * (x_t.ndim - 1)))
        std_t = torch.sqrt(torch.cos(tb) ** 2 * s**2 + torch.sin(tb) ** 2 * sigma_d**2)
        return mean + (x_t - torch.cos(tb) * mean) * s / std_t

    return f


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sample_consistency_matches_data_moments(steps):
    g = torch.Generator().manual_seed(steps)
    noise = SIGMA_DATA * torch.randn(4096, 16, generator=g, dtype=torch.float64)
    out = sample_consistency(analytic_consistency(), noise, steps=steps, generator=g)
    assert out.shape == noise.shape
    assert float(out.mean()) == pytest.approx(MEAN, abs=0.02)
    assert float(out.var()) == pytest.approx(S**2, rel=0.03)


def test_consistency_times():
    assert consistency_times(1) == [pytest.approx(t_max())]
    assert t_max() == pytest.approx(math.atan(80 / 0.5))
    assert consistency_times(2) == [pytest.approx(t_max()), T_MID]
    ts = consistency_times(4)
    assert len(ts) == 4 and all(a > b for a, b in zip(ts, ts[1:], strict=False))
    with pytest.raises(ValueError):
        consistency_times(0)


def test_sample_consistency_extra_noise_honoured():
    f = analytic_consistency()
    g = torch.Generator().manual_seed(0)
    noise = SIGMA_DATA * torch.randn(8, 4, generator=g, dtype=torch.float64)
    z = [SIGMA_DATA * torch.randn(8, 4, generator=g, dtype=torch.float64)]
    a = sample_consistency(f, noise, steps=2, extra_noise=z, generator=torch.Generator().manual_seed(1))
    b = sample_consistency(f, noise, steps=2, extra_noise=z, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)  # the generator is unused when extra_noise is given
    ts = consistency_times(2)
    lab = torch.zeros(8, dtype=torch.long)
    x0 = f(noise, torch.full((8,), ts[0], dtype=torch.float64), lab)
    x1 = math.cos(ts[1]) * x0 + math.sin(ts[1]) * z[0]
    torch.testing.assert_close(a, f(x1, torch.full((8,), ts[1], dtype=torch.float64), lab))
    c = sample_consistency(f, noise, steps=2, extra_noise=[-z[0]])
    assert not torch.allclose(a, c)
    d1 = sample_consistency(f, noise, steps=2, generator=torch.Generator().manual_seed(3))
    d2 = sample_consistency(f, noise, steps=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(d1, d2)
    with pytest.raises(ValueError):
        sample_consistency(f, noise, steps=3, extra_noise=z)
