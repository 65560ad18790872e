"""Score Fokker-Planck regulariser of FP-Diffusion (Lai et al. 2023, sony/fp-diffusion), in the EDM view.

With x_sigma = x0 + sigma eps (drift f = 0, g^2 = d sigma^2 / d sigma = 2 sigma), the score s = (D - x)/sigma^2
of the noisy marginals satisfies the score FPE   d_sigma s = sigma grad_x (div_x s + ||s||^2).
The residual r = d_sigma s - sigma grad_x(div s + ||s||^2) uses a central finite difference in sigma (relative
step h = h_rel sigma, in float32 with autocast off), the exact divergence for low dimension (one VJP per
coordinate) or one Hutchinson probe otherwise, and create_graph VJPs so the loss back-propagates through the
double backward.  No stop-gradient anywhere (as in the paper).
Loss: alpha * mean_b [w(sigma) mean_d r^2] with w = sigma^4 ("sigma4": makes sigma^2 r dimensionless, O(1)
across noise levels) or w = 2 sigma ("ll": FP-Diffusion's likelihood weighting g^2 in EDM time).
Optional scalar term beta * R_sc (the paper's scalar_fp="both"): R_sc = || c(sigma) (div s + ||s||^2) ||_2, the L2
norm across the batch, with c = g^2/2 = sigma ("ll", as the paper) or c = sigma^2 / D ("sigma4", dimensionless).
It is unanchored (log p is not modelled); for the exact score E_x[div s + ||s||^2] = 0 (Stein's identity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.networks import exact_autodiff
from .base import Batch, StepContext, register_objective
from .diffusion import perturb


def divergence(s: torch.Tensor, x: torch.Tensor, *, probe: torch.Tensor | None = None,
               create_graph: bool = True) -> torch.Tensor:
    """div_x s per sample [B]: exact (one VJP per coordinate) when probe is None, else Hutchinson v^T (ds/dx) v."""
    B = x.shape[0]
    if probe is not None:
        (vjp,) = torch.autograd.grad((s * probe).sum(), x, create_graph=create_graph)
        return (vjp * probe).flatten(1).sum(1)
    s_flat = s.reshape(B, -1)  # [B, D]
    div = torch.zeros(B, dtype=s.dtype, device=s.device)
    for i in range(s_flat.shape[1]):
        (g,) = torch.autograd.grad(s_flat[:, i].sum(), x, create_graph=create_graph)
        div = div + g.reshape(B, -1)[:, i]
    return div


def fpe_residual(score_fn, x: torch.Tensor, sigma: torch.Tensor, class_labels=None, *, h_rel: float = 1e-3,
                 probe: torch.Tensor | None = None, create_graph: bool = True) -> torch.Tensor:
    """Score-FPE residual r = d_sigma s - sigma grad_x(div s + ||s||^2) in the EDM view.  [B, ...]

    `score_fn(x_sigma, sigma [B], class_labels)` is the EDM score (e.g. `model.edm_score`); x: [B, ...];
    probe: None for the exact divergence, else a Rademacher tensor like x for Hutchinson."""
    return fpe_terms(score_fn, x, sigma, class_labels, h_rel=h_rel, probe=probe, create_graph=create_graph)[0]


def fpe_terms(score_fn, x: torch.Tensor, sigma: torch.Tensor, class_labels=None, *, h_rel: float = 1e-3,
              probe: torch.Tensor | None = None, create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(r [B, ...], q [B]): the score-FPE residual and the scalar q = div s + ||s||^2 it is built from."""
    x = x.detach().requires_grad_(True)
    s = score_fn(x, sigma, class_labels)  # [B, ...]
    q = divergence(s, x, probe=probe, create_graph=True) + s.flatten(1).square().sum(1)  # [B]
    (grad_q,) = torch.autograd.grad(q.sum(), x, create_graph=create_graph)  # [B, ...]
    h = h_rel * sigma  # [B]
    ds = (score_fn(x, sigma + h, class_labels) - score_fn(x, sigma - h, class_labels))  # [B, ...]
    shape = (-1, *([1] * (x.ndim - 1)))
    ds = ds / (2 * h).reshape(shape)
    return ds - sigma.reshape(shape) * grad_q, q


@dataclass(frozen=True)
class FPConfig:
    """alpha and the cost controls.  FP-Diffusion's alpha = 0.15 belongs to its VP weighting g^2 ||r||^2 / D^2; with
    the sigma^4 weighting here the penalty of a half-trained network is O(10-100), so the default is far smaller
    (on gmm2d, alpha >= 0.01 visibly slows the fit of the score: FP is a gentle regulariser, see methods.md §2)."""

    weight: float = 0.003
    scalar_weight: float = 0.0  # beta of the scalar term R_sc (the paper's default 0.01 with its "ll" weighting)
    h_rel: float = 1e-3  # finite-difference step relative to sigma
    divergence: str = "auto"  # "exact" | "hutchinson" | "auto" (exact when D <= exact_max_dim)
    exact_max_dim: int = 16
    weighting: str = "sigma4"  # "sigma4" | "ll"
    p_mean: float = -1.2
    p_std: float = 1.2
    batch_fraction: float = 1.0  # apply to the first ceil(f * b) samples
    every: int = 1  # apply every k steps (scaled by k to keep the expected weight)


@register_objective("fp", FPConfig)
class FPLoss:
    """Score-FPE residual penalty alpha * R_vec (+ beta * R_sc) (Lai et al. 2023, Eq. 12), EDM view."""

    def __init__(self, config: FPConfig):
        allowed = {"divergence": ("auto", "exact", "hutchinson"), "weighting": ("sigma4", "ll")}
        for key, values in allowed.items():
            if getattr(config, key) not in values:
                raise ValueError(f"fp.{key} = {getattr(config, key)!r}; allowed: {', '.join(values)}")
        if config.every < 1 or not 0 < config.batch_fraction <= 1 or config.h_rel <= 0 or config.scalar_weight < 0:
            raise ValueError("fp: every >= 1, 0 < batch_fraction <= 1, h_rel > 0 and scalar_weight >= 0 are required")
        self.config = config

    def __call__(self, model, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        c = self.config
        p = perturb(batch, ctx, c.p_mean, c.p_std, model.sigma_data)
        x_sigma, sigma, _ = p.edm_view(model.sigma_data)
        dim = math.prod(batch.x.shape[1:])
        hutch = c.divergence == "hutchinson" or (c.divergence == "auto" and dim > c.exact_max_dim)
        probe = torch.where(ctx.rand(batch.x.shape[1:]) < 0.5, -1.0, 1.0) if hutch else None  # Rademacher
        if ctx.step % c.every != 0:
            return {}
        k = max(1, math.ceil(c.batch_fraction * batch.size))
        y = None if batch.y is None else batch.y[:k]
        device_type = x_sigma.device.type
        # finite differences need float32; the double backward needs the math attention kernel, eager (exact_autodiff)
        with torch.autocast(device_type=device_type, enabled=False), exact_autodiff():
            r, q = fpe_terms(model.edm_score, x_sigma[:k].float(), sigma[:k].float(), y, h_rel=c.h_rel,
                             probe=None if probe is None else probe[:k])  # [k, ...], [k]
        s = sigma[:k].float()
        w = s**4 if c.weighting == "sigma4" else 2 * s  # [k]
        per = w * r.flatten(1).square().mean(1)  # [k]
        ctx.metrics["fp_residual"] = per.detach().mean()
        terms = {"fp": c.weight * c.every * per.mean()}
        if c.scalar_weight > 0:
            scale = s**2 / dim if c.weighting == "sigma4" else s  # [k]
            r_sc = (scale * q).norm()  # the L2 norm across the batch
            ctx.metrics["fp_scalar_norm"] = r_sc.detach()
            terms["fp_scalar"] = c.scalar_weight * c.every * r_sc
        return terms
