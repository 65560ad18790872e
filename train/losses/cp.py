"""Consistency-property regulariser of Consistent Diffusion Models (Daras et al. 2023, giannisdaras/cdm
`MartingaleLoss`), in the EDM view through `TrigFlowModel.denoise`.

From x = x0 + sigma eps, two independent reverse-SDE chains (Euler-Maruyama, no grad, the current network)
run from sigma to sigma' = max(sigma - delta, 0.002), delta ~ U[0, eps_max], on an EDM rho = 7 grid.  With the
chain ends x'_1, x'_2:  L_CP = mean_d (D(x'_1; sigma') - D(x; sigma)) (D(x'_2; sigma') - D(x; sigma)),
an unbiased estimate of ||E[D(x_sigma'; sigma') | x_sigma] - D(x_sigma; sigma)||^2 / d.  Gradients flow into
both denoiser calls; only the chains are detached.  The per-sample value may be negative: never clamp it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.trigflow import SIGMA_MIN, rho_interp
from .base import Batch, StepContext, register_objective
from .diffusion import perturb


def edm_grid(sigma: torch.Tensor, sigma_next: torch.Tensor, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Per-sample EDM rho-schedule from sigma to sigma_next: [steps + 1, B] (CDM `edm_schedule`)."""
    ramp = torch.linspace(0, 1, steps + 1, device=sigma.device, dtype=sigma.dtype)[:, None]  # [S+1, 1]
    return rho_interp(sigma[None, :], sigma_next[None, :], ramp, rho)


@torch.no_grad()
def reverse_sde_chain(
    denoise, x: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor, class_labels=None
) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE with per-sample sigmas (CDM `backward_sde_sampler`):
    x <- x + 2 (s' - s) (x - D(x; s)) / s + sqrt(2 |s - s'| s) xi.  sigmas: [S+1, B], noise: [S, B, ...]."""
    for i in range(sigmas.shape[0] - 1):
        s, s_next = sigmas[i], sigmas[i + 1]  # [B]
        d0 = denoise(x, s, class_labels)
        shape = (-1, *([1] * (x.ndim - 1)))
        s_b, sn_b = s.reshape(shape), s_next.reshape(shape)
        x = x + 2 * (sn_b - s_b) * (x - d0) / s_b + torch.sqrt(2 * (s_b - sn_b).abs() * s_b) * noise[i]
    return x


def cp_estimate(
    denoise,
    x: torch.Tensor,
    sigma: torch.Tensor,
    delta: torch.Tensor,
    noise1: torch.Tensor,
    noise2: torch.Tensor,
    class_labels=None,
    *,
    chain_steps: int = 5,
    sigma_min: float = SIGMA_MIN,
) -> torch.Tensor:
    """Per-sample CP violation estimate [B] (mean over dimensions); differentiable through `denoise`.
    `denoise(x_sigma, sigma [B], class_labels)` is the EDM denoiser, x: [B, ...] at sigma [B], delta: [B] the
    drift, noise1/noise2: [chain_steps, B, ...] standard normal draws of the two chains."""
    sigma_next = torch.clamp(sigma - delta, min=sigma_min)  # [B]
    grid = edm_grid(sigma, sigma_next, chain_steps)  # [S+1, B]
    x1 = reverse_sde_chain(denoise, x, grid, noise1, class_labels)
    x2 = reverse_sde_chain(denoise, x, grid, noise2, class_labels)
    d_x = denoise(x, sigma, class_labels)  # [B, ...]
    labels2 = None if class_labels is None else torch.cat([class_labels, class_labels])
    d_ends = denoise(torch.cat([x1, x2]), torch.cat([sigma_next, sigma_next]), labels2)  # [2B, ...]
    d1, d2 = d_ends.chunk(2)
    return ((d1 - d_x) * (d2 - d_x)).flatten(1).float().mean(1)  # [B]


@dataclass(frozen=True)
class CPConfig:
    """CDM defaults: lambda_CP 2 (class default; 10 on their command line), 5 chain steps, eps_max 0.05."""

    weight: float = 2.0
    eps_max: float = 0.05
    chain_steps: int = 5
    p_mean: float = -1.2  # the same perturbation as the diffusion term when these match
    p_std: float = 1.2
    batch_fraction: float = 1.0  # apply to the first ceil(f * b) samples of the batch
    every: int = 1  # apply every k steps (the term is scaled by k to keep its expected weight)
    scale_by_sigma_data2: bool = True  # express in units of the v-loss (sigma_d^2 lambda DSM), see module doc


@register_objective("cp", CPConfig)
class CPLoss:
    """CDM consistency-property loss lambda_CP * L_CP (Daras et al. 2023, Eq. 9)."""

    def __init__(self, config: CPConfig):
        if config.chain_steps < 1 or config.every < 1 or not 0 < config.batch_fraction <= 1:
            raise ValueError("cp: chain_steps >= 1, every >= 1 and 0 < batch_fraction <= 1 are required")
        self.config = config

    def __call__(self, model, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        c = self.config
        p = perturb(batch, ctx, c.p_mean, c.p_std, model.sigma_data)
        x_sigma, sigma, _ = p.edm_view(model.sigma_data)
        delta = c.eps_max * ctx.rand()  # [b]
        tail = batch.x.shape[1:]
        n1 = ctx.randn((c.chain_steps, *tail)).transpose(0, 1)  # [S, b, ...]
        n2 = ctx.randn((c.chain_steps, *tail)).transpose(0, 1)
        if ctx.step % c.every != 0:
            return {}
        k = max(1, math.ceil(c.batch_fraction * batch.size))
        y = None if batch.y is None else batch.y[:k]
        per = cp_estimate(model.denoise, x_sigma[:k], sigma[:k], delta[:k], n1[:, :k], n2[:, :k], y,
                          chain_steps=c.chain_steps)
        scale = model.sigma_data**2 if c.scale_by_sigma_data2 else 1.0
        ctx.metrics["cp_raw"] = per.detach().mean()
        return {"cp": c.weight * c.every * scale * per.mean()}
