"""Direct consistency models and the discrete-time consistency-distillation (CD) baseline
(Direct CMs: layer6ai-labs/direct-cms, `train_direct_cm.py` / `train_cm.py`; CD: Song et al. 2023, Alg. 2).

Both work on the EDM/Karras grid sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min > sigma_N = 0
(`karras_sigmas(N)`) in the EDM view of a TrigFlowModel (x_sigma = x_t / cos t, D = `model.denoise`), and the
student's 1-step output is f_theta(x_t, t) = D_theta(x_sigma; sigma):

- Direct CM: x_sigma_n = x0 + sigma_n eps for a uniform level n; target = the teacher's PF-ODE solution from the
  SAME x_sigma_n down to 0 with the core Heun (or Euler) sampler over the remaining grid sigmas[n:]
  (a full no-grad solve).  Loss = mean_d (f_theta(x_sigma_n) - target)^2 (or pseudo-Huber).
- CD: level n in 0..N-2, one teacher solver step sigma_n -> sigma_{n+1}, target = f_theta-(x_hat_{n+1}, sigma_{n+1})
  with theta- = stopgrad(current weights) (no EMA, as in the Direct-CM paper's baseline).

The teacher runs in float32 without autocast; the student forward uses bf16 autocast on CUDA when `bf16` is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.sampling import heun_teacher_sample, karras_sigmas, one_step_sample, sample_euler, sample_heun
from ..core.trigflow import SIGMA_MAX, SIGMA_MIN, bcast
from .base import Batch, StepContext, register_objective

SOLVERS = ("heun", "euler")
LOSSES = ("l2", "pseudo_huber")


def _solver(name: str):
    if name not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {name!r}")
    return sample_heun if name == "heun" else sample_euler


def level_sigmas(num_levels: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = 7.0,
                 device=None) -> torch.Tensor:
    """The discretisation: N Karras levels sigma_max..sigma_min followed by 0 (EDM Eq. 5).  [N+1]"""
    return karras_sigmas(num_levels, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, device=device)


@torch.no_grad()
def teacher_solve(
    teacher: nn.Module,
    x_sigma: torch.Tensor,
    level: torch.Tensor,
    sigmas: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    solver: str = "heun",
    stop: torch.Tensor | None = None,
) -> torch.Tensor:
    """Solve the teacher's PF-ODE for each sample from sigmas[level[i]] to sigmas[stop[i]] (default: to 0, the end).

    Equals `sample_heun(teacher.denoise, x_sigma[i], sigmas[level[i]:stop[i] + 1])` per sample: the whole batch walks
    the shared grid and a sample only steps while level <= k < stop (the direct-cms `no_step` mask), one core
    solver step at a time.  x_sigma: [B, ...], level/stop: [B] int64 grid indices."""
    step_fn = _solver(solver)
    n_last = len(sigmas) - 1
    stop = torch.full_like(level, n_last) if stop is None else stop
    x = x_sigma.clone()
    k_lo = int(level.min()) if level.numel() else n_last
    for k in range(k_lo, n_last):
        active = (level <= k) & (k < stop)  # [B]
        if not bool(active.any()):
            continue
        idx = active.nonzero().squeeze(1)
        labels = class_labels[idx] if class_labels is not None else None
        x[idx] = step_fn(teacher.denoise, x[idx], sigmas[k : k + 2], class_labels=labels)
    return x


def draw_levels(u: torch.Tensor, n_levels: int, top_level_prob: float = 0.0) -> torch.Tensor:
    """Grid levels from uniform draws u in [0, 1): level 0 with probability p = top_level_prob, else uniform over
    0..n_levels-1 (one draw per sample, so p = 0 is exactly floor(u * n_levels)).  [b] int64"""
    p = top_level_prob
    rest = ((u - p).clamp(min=0.0) / (1.0 - p) * n_levels).long().clamp(max=n_levels - 1)  # [b]
    return torch.where(u < p, torch.zeros_like(rest), rest)


def _per_sample_distance(a: torch.Tensor, b: torch.Tensor, loss: str, huber_c: float) -> torch.Tensor:
    """mean_d (a - b)^2, or the pseudo-Huber sqrt(mean_d (a - b)^2 + c^2) - c (iCT).  [B]"""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    mse = (a.float() - b.float()).square().flatten(1).mean(dim=1)
    return mse if loss == "l2" else torch.sqrt(mse + huber_c**2) - huber_c


@dataclass(frozen=True)
class DirectCMConfig:
    """Direct CM / CD hyper-parameters: the level grid (N Karras levels), the teacher solver and the distance."""

    weight: float = 1.0
    num_levels: int = 18  # N (the Direct-CM paper uses 100 DDIM timesteps; 18 = EDM's Heun grid)
    solver: str = "heun"  # teacher solver: "heun" (EDM Alg. 2) or "euler"
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = 7.0
    loss: str = "l2"  # "l2" or "pseudo_huber"
    huber_c: float = 1e-3
    bf16: bool = True  # on CUDA: bf16 autocast for the student forward
    # Probability of drawing level 0 (sigma_max, where the 1-step sampler starts); the other draws are uniform over
    # all N levels.  0 = the Direct-CM paper's uniform levels.  Only level 0 trains the 1-step map directly.
    top_level_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.num_levels < 2:
            raise ValueError(f"num_levels must be >= 2, got {self.num_levels}")
        _solver(self.solver)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.top_level_prob < 1.0:
            raise ValueError(f"top_level_prob must be in [0, 1), got {self.top_level_prob}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")


class _GridDistillation:
    """Shared body: draw a level n and eps, form x_sigma = x0 + sigma_n eps, build the target, regress."""

    name = "direct_cm"
    needs_teacher = True
    init_from_teacher = True  # start the student from the teacher's EMA (same architecture)
    sampler = "consistency"  # the trainer's sample grid uses 1-step consistency sampling
    max_level_offset = 0  # levels are 0..N-1-max_level_offset

    def __init__(self, config: DirectCMConfig):
        self.config = config

    def target(self, model, teacher, x_sigma, level, sigmas, labels) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, model: Any, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg = self.config
        if ctx.teacher is None:
            raise ValueError(f"objective {self.name!r} needs a teacher checkpoint (--teacher DIR)")
        sigmas = level_sigmas(cfg.num_levels, cfg.sigma_min, cfg.sigma_max, cfg.rho, device=batch.x.device)  # [N+1]
        n_levels = cfg.num_levels - self.max_level_offset
        level = draw_levels(ctx.rand(), n_levels, cfg.top_level_prob)  # [b]
        eps = ctx.randn(batch.x.shape[1:])  # [b, ...]
        sigma = sigmas[level]  # [b]
        x_sigma = batch.x + bcast(sigma, batch.x) * eps  # [b, ...]
        with torch.autocast(device_type=x_sigma.device.type, enabled=False):
            target = self.target(model, ctx.teacher, x_sigma, level, sigmas, batch.y).float()
        use_bf16 = cfg.bf16 and x_sigma.device.type == "cuda"
        with torch.autocast(device_type=x_sigma.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            pred = model.denoise(x_sigma, sigma, batch.y)  # f_theta(x_t, t) in the EDM view  [b, ...]
        dist = _per_sample_distance(pred, target, cfg.loss, cfg.huber_c)  # [b]
        ctx.metrics[f"{self.name}/mse_x0"] = dist.detach().mean()
        return {self.name: cfg.weight * dist.mean()}


@register_objective("direct_cm", DirectCMConfig)
class DirectCMLoss(_GridDistillation):
    """Direct CM: regress f_theta(x_sigma_n) onto the teacher's Heun PF-ODE solution from the same point (Direct CMs)."""

    name = "direct_cm"

    def target(self, model, teacher, x_sigma, level, sigmas, labels) -> torch.Tensor:
        return teacher_solve(teacher, x_sigma, level, sigmas, labels, solver=self.config.solver)


@register_objective("cd", DirectCMConfig)
class CDLoss(_GridDistillation):
    """Discrete-time CD: target f_theta-(x_hat_{n+1}) after one teacher step sigma_n -> sigma_{n+1} (Song et al. 2023)."""

    name = "cd"
    max_level_offset = 1  # the last level sigma_min has no next level > 0

    def target(self, model, teacher, x_sigma, level, sigmas, labels) -> torch.Tensor:
        x_next = teacher_solve(teacher, x_sigma, level, sigmas, labels, solver=self.config.solver, stop=level + 1)
        with torch.no_grad():
            return model.denoise(x_next, sigmas[level + 1], labels)  # theta- = stopgrad(theta)


@torch.no_grad()
def ode_error(student: nn.Module, teacher: nn.Module, noise: torch.Tensor, *, heun_steps: int = 18,
              class_labels: torch.Tensor | None = None) -> float:
    """Direct-CM ODE error: mean_d (f_student(sigma_max eps) - teacher Heun PF-ODE solution from the same eps)^2.

    `noise` is standard-normal eps [B, ...]; the student's 1-step sample and the teacher's `heun_steps`-step solve
    both start at x_sigma = sigma_max eps (x_t at t_max = arctan(sigma_max / sigma_d))."""
    ref = heun_teacher_sample(teacher, noise, num_steps=heun_steps, class_labels=class_labels)
    one = one_step_sample(student, noise, class_labels)
    return float((one - ref).square().flatten(1).mean())


__all__ = [
    "CDLoss",
    "DirectCMConfig",
    "DirectCMLoss",
    "draw_levels",
    "level_sigmas",
    "ode_error",
    "teacher_solve",
]
