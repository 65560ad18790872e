"""Stable Target Field (Xu et al. 2023, Newbeeer/stf): the DSM target x0 is replaced by the posterior mean of
x0 under a reference batch r_1..r_R, y_hat_i = sum_j softmax_j(-||x_i - r_j||^2 / (2 sigma_i^2)) r_j, where
x_i = x0_i + sigma_i eps_i is the EDM-view noisy sample.  The reference batch starts with the global
minibatch itself.  Distances are computed chunk by chunk through ||x||^2 - 2 x.r + ||r||^2 with an online
log-sum-exp, never materialising the B x R x D tensor; for conditional models only references of the same
class count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Batch, StepContext, register_objective
from .diffusion import DiffusionConfig, DiffusionLoss, Perturbation


@torch.no_grad()
def stf_targets(
    x_sigma: torch.Tensor,
    sigma: torch.Tensor,
    refs: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Posterior mean of x0 under the empirical reference distribution (STF Eq. 6), computed in chunks.

    x_sigma: [B, ...] noisy samples, sigma: [B], refs: [R, ...]; labels [B] / ref_labels [R] restrict each row to
    references of its class (every row must have at least one).  Returns [B, ...] in float32.
    Always computed in float32 with autocast disabled: under the trainer's bf16 autocast the matmul in
    ||x||^2 - 2 x.r + ||r||^2 would run in bfloat16 and cancel catastrophically.
    """
    with torch.autocast(device_type=x_sigma.device.type, enabled=False):
        return _stf_targets_fp32(x_sigma, sigma, refs, labels, ref_labels, chunk)


def _stf_targets_fp32(x_sigma, sigma, refs, labels, ref_labels, chunk) -> torch.Tensor:
    B, R = x_sigma.shape[0], refs.shape[0]
    x = x_sigma.reshape(B, -1).float()  # [B, D]
    r_all = refs.reshape(R, -1).float()  # [R, D]
    inv2s2 = 1.0 / (2.0 * sigma.float().reshape(B, 1) ** 2)  # [B, 1]
    x2 = x.square().sum(1, keepdim=True)  # [B, 1]
    m = torch.full((B, 1), -float("inf"), device=x.device)  # running max of logits
    den = torch.zeros(B, 1, device=x.device)  # running sum of exp(logit - m)
    num = torch.zeros_like(x)  # running sum of exp(logit - m) r_j      [B, D]
    for s in range(0, R, chunk):
        r = r_all[s : s + chunk]  # [Rc, D]
        d2 = (x2 - 2.0 * x @ r.T + r.square().sum(1)[None, :]).clamp_min(0.0)  # [B, Rc]
        logits = -d2 * inv2s2  # [B, Rc]
        if labels is not None and ref_labels is not None:
            same = labels.reshape(B, 1) == ref_labels[s : s + chunk].reshape(1, -1)  # [B, Rc]
            logits = logits.masked_fill(~same, -float("inf"))
        m_new = torch.maximum(m, logits.max(1, keepdim=True).values)  # [B, 1]
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        scale = torch.exp(m - m_safe)  # [B, 1] (0 while nothing seen yet)
        w = torch.exp(logits - m_safe)  # [B, Rc]
        den = den * scale + w.sum(1, keepdim=True)
        num = num * scale + w @ r
        m = m_new
    if not bool((den > 0).all()):
        raise ValueError("STF: a sample has no reference of its class; the reference batch must contain the batch")
    return (num / den).reshape(x_sigma.shape)


@dataclass(frozen=True)
class STFConfig(DiffusionConfig):
    """The v-loss hyper-parameters plus the reference batch size R (STF's --rbatch; includes the batch)."""

    ref_batch: int = 1024
    chunk: int = 1024


@register_objective("stf", STFConfig)
class STFLoss(DiffusionLoss):
    """The diffusion v-loss with the Stable Target Field target (Xu et al. 2023, Alg. 1)."""

    name = "stf"

    def target_velocity(self, model, batch: Batch, ctx: StepContext, p: Perturbation) -> torch.Tensor:
        """v_hat = (cos t x_t - y_hat) / sin t, so that D - y_hat = sin t (v_hat - sigma_d F)."""
        if ctx.references is None:
            raise RuntimeError("the STF objective needs a reference-batch provider in the step context")
        refs = ctx.references(max(self.config.ref_batch, 0))  # Batch of R >= B rows, starts with the global batch
        x_sigma, sigma, _ = p.edm_view(model.sigma_data)
        conditional = model.num_classes > 0 and batch.y is not None and refs.y is not None
        y_hat = stf_targets(x_sigma, sigma, refs.x.to(x_sigma.device),
                            labels=batch.y if conditional else None,
                            ref_labels=refs.y.to(x_sigma.device) if conditional else None,
                            chunk=self.config.chunk)
        t = p.t.reshape(-1, *([1] * (p.x_t.ndim - 1)))
        return (torch.cos(t) * p.x_t - y_hat) / torch.sin(t)
