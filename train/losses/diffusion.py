"""The TrigFlow diffusion (teacher) loss ||sigma_d F_theta - v_t||^2 (sCM paper, Sec. 3; equivalent to EDM DSM)
with EDM2/sCM adaptive weighting by a learned log-variance u(t) and label dropout for classifier-free guidance.

Per sample: L = mean_d (sigma_d F_theta(x_t / sigma_d, t, y) - v_t)^2 / e^{u(t)} + u(t)
(EDM2 Eq. 8 / sCM Eq. 8 with u = logvar = -w_phi).  Since D - x0 = sin t (v_t - sigma_d F), the unweighted
term equals sigma_d^2 lambda(sigma) ||D(x_sigma; sigma) - x0||^2 / D with EDM's lambda = 1 / (sigma_d sin t)^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import trigflow
from .base import Batch, StepContext, register_objective


@dataclass(frozen=True)
class DiffusionConfig:
    """Hyper-parameters of the v-loss (EDM teacher defaults: P_mean -1.2, P_std 1.2)."""

    weight: float = 1.0
    p_mean: float = -1.2
    p_std: float = 1.2
    label_dropout: float = 0.0  # probability of replacing a label by the null label (CFG training)
    adaptive_weighting: bool = True  # divide by e^{u(t)} and add u(t) (needs the model's logvar head)


@dataclass(frozen=True)
class Perturbation:
    """One draw of the forward process for a batch, shared by every objective of a step."""

    t: torch.Tensor  # [b] TrigFlow times
    z: torch.Tensor  # [b, ...] noise, already scaled by sigma_d
    x_t: torch.Tensor  # [b, ...] cos t x0 + sin t z

    def edm_view(self, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_sigma = x0 + sigma eps, sigma [b], eps = z / sigma_d) in the EDM view."""
        sigma = trigflow.t_to_sigma(self.t, sigma_data)
        return trigflow.x_t_to_x_sigma(self.x_t, self.t), sigma, self.z / sigma_data


def perturb(batch: Batch, ctx: StepContext, p_mean: float, p_std: float, sigma_data: float) -> Perturbation:
    """x_t = cos t x0 + sin t z with t ~ the sCM/EDM log-normal and z ~ N(0, sigma_d^2 I); shared per step."""

    def make() -> Perturbation:
        t = ctx.training_t(p_mean, p_std, sigma_data)  # [b]
        z = sigma_data * ctx.randn(batch.x.shape[1:])  # [b, ...]
        return Perturbation(t, z, trigflow.diffuse(batch.x, z, t))

    return ctx.shared(("perturb", float(p_mean), float(p_std), float(sigma_data)), make)


def drop_labels(labels: torch.Tensor | None, num_classes: int, p: float, ctx: StepContext) -> torch.Tensor | None:
    """Classifier-free guidance training: replace each label by the null label `num_classes` with probability p."""
    if labels is None or num_classes <= 0 or p <= 0:
        return labels
    drop = ctx.rand() < p  # [b]
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


def adaptive_weighting(per_sample: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """EDM2 uncertainty weighting: L / e^u + u, per sample ([b] -> [b])."""
    return per_sample / torch.exp(logvar) + logvar


@register_objective("diffusion", DiffusionConfig)
class DiffusionLoss:
    """TrigFlow v-loss with adaptive weighting (sCM Sec. 3, EDM2 Sec. 5)."""

    name = "diffusion"

    def __init__(self, config: DiffusionConfig):
        self.config = config

    def target_velocity(self, model, batch: Batch, ctx: StepContext, p: Perturbation) -> torch.Tensor:
        """The regression target v_t = cos t z - sin t x0 (overridden by STF)."""
        return trigflow.velocity_target(batch.x, p.z, p.t)

    def __call__(self, model, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        c = self.config
        sd = model.sigma_data
        p = perturb(batch, ctx, c.p_mean, c.p_std, sd)
        labels = drop_labels(batch.y, model.num_classes, c.label_dropout, ctx)
        with torch.no_grad():
            v = self.target_velocity(model, batch, ctx, p)  # [b, ...]
        F_out = model(p.x_t, p.t, labels)  # [b, ...]
        mse = (sd * F_out.float() - v.float()).square().flatten(1).mean(1)  # [b]
        ctx.metrics[f"{self.name}_mse"] = mse.detach().mean()
        if c.adaptive_weighting:
            loss = adaptive_weighting(mse, model.logvar(p.t).float())
        else:
            loss = mse
        return {self.name: c.weight * loss.mean()}
