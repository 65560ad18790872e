"""Continuous-time consistency models in TrigFlow: sCT and sCD (Lu & Song 2025, "Simplifying, Stabilizing and
Scaling Continuous-Time Consistency Models", Sec. 4 and App. D).

Consistency function f_theta(x_t, t) = cos t x_t - sin t sigma_d F_theta(x_t / sigma_d, t).  The training signal
is the tangent g = cos t * df_theta-/dt along the PF-ODE (theta- = stopgrad(theta), the CURRENT weights, not EMA):

    g = -cos^2 t (sigma_d F- - dx_t/dt) - r cos t sin t (x_t + sigma_d dF-/dt)

with dx_t/dt = cos t z - sin t x0 (sCT) or sigma_d F_teacher(x_t / sigma_d, t) (sCD), r = min(1, step / H)
the tangent warm-up.  cos t sin t dF-/dt is ONE forward-mode JVP of `model.forward` at (x_t, t) with tangent
(cos t sin t dx_t/dt, cos t sin t); since `model.forward` itself feeds x_t / sigma_d to the backbone, the
backbone receives the x-tangent cos t sin t dx_t/dt / sigma_d, i.e. exactly what it sees as input.

Tangent normalisation g <- g / (||g|| + c).  NORM CONVENTION: `tangent_norm = "rms"` (default) uses the per-sample
RMS norm ||g||_2 / sqrt(D) (FastGen, sCM-mnist: the constant c = 0.1 then means the same at every resolution);
`"l2"` uses the plain per-sample L2 norm (rCM; c becomes negligible for images).

Loss per sample: w(t) e^{-u(t)} mean_d (F_theta - F- - g)^2 + u(t), u = model.logvar(t) (adaptive weighting,
u = -w_phi), w(t) = 1 / sigma = 1 / (sigma_d tan t) when `prior_weight` is on, else 1.  F_theta - F- is zero in
value, so the gradient is -2 w e^{-u} g . dF_theta/dtheta / D: a pure tangent-following update.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core import trigflow
from ..core.jvp import LinearisedLayers, forward_ad_jvp  # noqa: F401  (the JVP engine lives in core)
from ..core.networks import exact_autodiff
from ..core.trigflow import bcast
from .base import Batch, StepContext, register_objective

TANGENT_NORMS = ("rms", "l2")
JVP_METHODS = ("autograd", "forward_ad", "finite_difference")
_T_EDGE = 1e-5  # keep finite-difference probes inside (0, pi/2)


# ----------------------------------------------------------------------------------------------- pieces
def per_sample_norm(x: torch.Tensor, norm: str = "rms") -> torch.Tensor:
    """Per-sample vector norm: L2 or RMS (L2 / sqrt(D)).  [B, ...] -> [B]"""
    if norm not in TANGENT_NORMS:
        raise ValueError(f"tangent_norm must be one of {TANGENT_NORMS}, got {norm!r}")
    n = torch.linalg.vector_norm(x.flatten(1), dim=1)
    return n / math.sqrt(x[0].numel()) if norm == "rms" else n


def normalize_tangent(g: torch.Tensor, c: float = 0.1, norm: str = "rms") -> torch.Tensor:
    """Tangent normalisation g / (||g|| + c) (sCM Sec. 4.2).  g: [B, ...]"""
    return g / bcast(per_sample_norm(g, norm) + c, g)


def warmup_ratio(step: int, warmup_steps: int) -> float:
    """Tangent warm-up r = min(1, step / H) (sCM Sec. 4.2); H <= 0 means no warm-up (r = 1)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def _frozen_forward(model: nn.Module, class_labels: torch.Tensor | None):
    """F_theta-(x_t, t): the model's forward with the current weights detached (theta- = stopgrad(theta))."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, (params, buffers), (x_t, t, class_labels))

    return fn


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Promote half/bfloat16 to float32 (float64 stays float64, for exact checks)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _fork_devices(x: torch.Tensor) -> list[Any]:
    return [x.device] if x.device.type == "cuda" else []



def trigflow_jvp(
    model: nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    dxdt: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    method: str = "autograd",
    fd_eps: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F-(x_t, t), cos t sin t dF-/dt) along dx_t/dt, in float32 with no gradient (sCM Sec. 4.1 JVP rearrangement).

    method 'autograd': torch.func.jvp of model.forward with tangents (cos t sin t dx_t/dt, cos t sin t).
    method 'forward_ad': the same JVP by dual numbers with hand-written conv/GroupNorm tangents (`forward_ad_jvp`).
    method 'finite_difference': central difference at t +- h, x_t +- h dx_t/dt with h = fd_eps * t (FastGen);
    both probes use the same dropout mask (torch.random.fork_rng).  x_t, dxdt: [B, ...], t: [B].
    """
    if method not in JVP_METHODS:
        raise ValueError(f"jvp method must be one of {JVP_METHODS}, got {method!r}")
    fn = _frozen_forward(model, class_labels)
    x_t, t, dxdt = _f32(x_t.detach()), _f32(t.detach()), _f32(dxdt.detach())
    cs = torch.cos(t) * torch.sin(t)  # [B]
    device_type = x_t.device.type
    # forward-mode AD: math attention kernel, eager backbone (exact_autodiff); the finite difference keeps the default
    kernel = exact_autodiff() if method != "finite_difference" else contextlib.nullcontext()
    with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False), kernel:
        if method == "autograd":
            F_minus, cs_dFdt = torch.func.jvp(fn, (x_t, t), (bcast(cs, x_t) * dxdt, cs))
            return F_minus, cs_dFdt
        if method == "forward_ad":
            return forward_ad_jvp(fn, (x_t, t), (bcast(cs, x_t) * dxdt, cs))
        h = (fd_eps * t.abs()).clamp(min=1e-6)  # [B]
        t_plus = (t + h).clamp(max=math.pi / 2 - _T_EDGE)
        t_minus = (t - h).clamp(min=_T_EDGE)
        x_plus = x_t + bcast(t_plus - t, x_t) * dxdt
        x_minus = x_t + bcast(t_minus - t, x_t) * dxdt
        with torch.random.fork_rng(devices=_fork_devices(x_t)):
            F_plus = _f32(fn(x_plus, t_plus))
        with torch.random.fork_rng(devices=_fork_devices(x_t)):
            F_minus_ = _f32(fn(x_minus, t_minus))
        dFdt = (F_plus - F_minus_) / bcast(t_plus - t_minus, x_t)
        return 0.5 * (F_plus + F_minus_), bcast(cs, x_t) * dFdt


def scm_tangent(
    F_minus: torch.Tensor,
    cs_dFdt: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    dxdt: torch.Tensor,
    r: float,
    sigma_data: float,
) -> torch.Tensor:
    """Raw sCM tangent g = -cos^2 t (sigma_d F- - dx_t/dt) - r cos t sin t (x_t + sigma_d dF-/dt) (sCM Eq. 7-8).

    `cs_dFdt` is cos t sin t dF-/dt as returned by `trigflow_jvp`.  All [B, ...] except t [B]; float32."""
    cos, sin = torch.cos(t), torch.sin(t)
    g1 = -bcast(cos * cos, x_t) * (sigma_data * F_minus - dxdt)
    g2 = -(bcast(cos * sin, x_t) * x_t + sigma_data * cs_dFdt)
    return g1 + r * g2


def scm_per_sample_loss(
    F_theta: torch.Tensor,
    g: torch.Tensor,
    logvar: torch.Tensor,
    t: torch.Tensor,
    sigma_data: float,
    *,
    prior_weight: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sCM loss with adaptive weighting: (w(t) e^{-u} mean_d (F_theta - F- - g)^2 + u, unweighted mean_d term).

    F- = stopgrad(F_theta) (zero in value); w(t) = 1/(sigma_d tan t) with `prior_weight`.  Returns two [B]."""
    F_theta = _f32(F_theta)
    diff = F_theta - F_theta.detach() - g  # [B, ...]
    mse = diff.square().flatten(1).mean(dim=1)  # [B]
    w = 1.0 / trigflow.t_to_sigma(t, sigma_data) if prior_weight else torch.ones_like(t)
    logvar = _f32(logvar)
    return w * torch.exp(-logvar) * mse + logvar, mse


def scm_velocity_sct(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sCT: dx_t/dt = cos t z - sin t x0, the conditional (single-sample) PF-ODE velocity."""
    return trigflow.velocity_target(x0, z, t)


@torch.no_grad()
def scm_velocity_scd(teacher: nn.Module, x_t: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
    """sCD: dx_t/dt = sigma_d F_teacher(x_t / sigma_d, t) from the frozen teacher (EMA), in float32 (or float64)."""
    with torch.autocast(device_type=x_t.device.type, enabled=False):
        return _f32(teacher.velocity(_f32(x_t), _f32(t), class_labels))


# ----------------------------------------------------------------------------------------------- objectives
@dataclass(frozen=True)
class SCMConfig:
    """sCM hyper-parameters (paper defaults for CIFAR-10: P_mean -1.0, P_std 1.4, c 0.1, H 10k)."""

    weight: float = 1.0
    p_mean: float = -1.0
    p_std: float = 1.4
    tangent_c: float = 0.1
    # "rms" (||g|| / sqrt(D), FastGen; the sCT/sCD presets but one) or "l2" (digits-scd, the bundled model until
    # issue 17's sixth session: measured better on digits, docs/students.md)
    tangent_norm: str = "rms"
    warmup_steps: int = 0  # H; 0 = warmup_frac * total_steps
    warmup_frac: float = 0.1  # H scaled to the run length (paper: 10k of 100k-400k iterations)
    prior_weight: bool = False  # multiply by 1/sigma (the paper's prior weighting; sCM-mnist found it unstable)
    # learned adaptive weighting e^{-u(t)} (.) + u(t) (the paper's w_phi).  Off: u = 0 and the logvar head is unused.
    adaptive_weighting: bool = True
    # "forward_ad" (exact, dual numbers with hand-written conv/GroupNorm tangents: ~1.7x cheaper than
    # "autograd" = torch.func.jvp on the U-Net, same values to float rounding) or "finite_difference"
    jvp: str = "forward_ad"
    # finite-difference step h = fd_eps * t (FastGen).  With the core default time_scale 1000 the t-embedding has
    # frequencies up to ~1.6k rad and 1e-3 is coarse (measured on a random MLP: 55% JVP error; 1e-4: 6%).
    fd_eps: float = 1e-3
    bf16: bool = True  # on CUDA: bf16 autocast for the student forward (JVP and tangent always fp32)

    def __post_init__(self) -> None:
        if self.tangent_norm not in TANGENT_NORMS:
            raise ValueError(f"tangent_norm must be one of {TANGENT_NORMS}, got {self.tangent_norm!r}")
        if self.jvp not in JVP_METHODS:
            raise ValueError(f"jvp must be one of {JVP_METHODS}, got {self.jvp!r}")
        if self.tangent_c < 0:
            raise ValueError(f"tangent_c must be >= 0, got {self.tangent_c}")
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_frac <= 1.0:
            raise ValueError(f"warmup_steps must be >= 0 and warmup_frac in [0, 1], got "
                             f"{self.warmup_steps}, {self.warmup_frac}")
        if self.fd_eps <= 0:
            raise ValueError(f"fd_eps must be > 0, got {self.fd_eps}")

    def horizon(self, total_steps: int) -> int:
        """The warm-up length H in steps."""
        return self.warmup_steps if self.warmup_steps > 0 else int(round(self.warmup_frac * total_steps))


@dataclass
class SCMStep:
    """Everything one sCM evaluation produced (for tests and diagnostics)."""

    loss: torch.Tensor  # [B] weighted per-sample loss
    mse: torch.Tensor  # [B] unweighted mean_d (F_theta - F- - g)^2 (= ||g_normalised||^2 / D)
    g_raw: torch.Tensor  # [B, ...] tangent before normalisation
    g: torch.Tensor  # [B, ...] normalised tangent
    finite: torch.Tensor  # [B] bool: tangent finite
    r: float


def scm_step(
    model: nn.Module,
    x0: torch.Tensor,
    z: torch.Tensor,
    t: torch.Tensor,
    dxdt: torch.Tensor | None,
    config: SCMConfig,
    *,
    r: float,
    class_labels: torch.Tensor | None = None,
) -> SCMStep:
    """One sCM loss evaluation at x_t = cos t x0 + sin t z; dxdt None means sCT (cos t z - sin t x0)."""
    x_t = trigflow.diffuse(x0, z, t)  # [B, ...]
    if dxdt is None:
        dxdt = scm_velocity_sct(x0, z, t)
    sd = float(model.sigma_data)
    use_bf16 = config.bf16 and x_t.device.type == "cuda"
    with torch.autocast(device_type=x_t.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        F_theta = model(x_t, t, class_labels)  # [B, ...]
    F_minus, cs_dFdt = trigflow_jvp(model, x_t, t, dxdt, class_labels, method=config.jvp, fd_eps=config.fd_eps)
    with torch.no_grad():
        g_raw = scm_tangent(F_minus, cs_dFdt, _f32(x_t), _f32(t), _f32(dxdt), r, sd)
        finite = torch.isfinite(g_raw.flatten(1)).all(dim=1)  # [B]
        g = normalize_tangent(torch.where(bcast(finite, g_raw), g_raw, torch.zeros_like(g_raw)),
                              config.tangent_c, config.tangent_norm)
    logvar = model.logvar(_f32(t)) if config.adaptive_weighting else torch.zeros_like(_f32(t))
    loss, mse = scm_per_sample_loss(F_theta, g, logvar, _f32(t), sd, prior_weight=config.prior_weight)
    return SCMStep(loss, mse.detach(), g_raw, g, finite, r)


def _zero_loss(model: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """A scalar 0 connected to every trainable parameter (exactly zero gradients, backward() still works)."""
    zero = torch.zeros((), device=like.device, dtype=torch.float32)
    for p in model.parameters():
        if p.requires_grad:
            zero = zero + 0.0 * p.reshape(-1)[:1].sum().float()
    return zero


class _SCMBase:
    """Shared sCT/sCD objective body: draw t, z; build dx_t/dt; tangent; adaptive-weighted loss."""

    name = "scm"
    needs_teacher = False
    init_from_teacher = False
    sampler = "consistency"  # the trainer's sample grid uses 1-step consistency sampling

    def __init__(self, config: SCMConfig):
        self.config = config
        self.skipped_steps = 0  # steps whose tangent was non-finite (the step was skipped)

    def velocity(self, model, x0, z, t, batch: Batch, ctx: StepContext) -> torch.Tensor | None:
        return None

    def __call__(self, model: Any, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg = self.config
        sd = float(model.sigma_data)
        t = ctx.training_t(cfg.p_mean, cfg.p_std, sd)  # [b]
        z = sd * ctx.randn(batch.x.shape[1:])  # [b, ...]
        dxdt = self.velocity(model, batch.x, z, t, batch, ctx)
        r = warmup_ratio(ctx.step, cfg.horizon(ctx.total_steps))
        out = scm_step(model, batch.x, z, t, dxdt, cfg, r=r, class_labels=batch.y)
        ctx.metrics[f"{self.name}/r"] = r
        ctx.metrics[f"{self.name}/mse"] = out.mse.mean()  # diagnostics stay on the device (read when logged)
        ctx.metrics[f"{self.name}/g_raw_rms"] = per_sample_norm(
            torch.nan_to_num(out.g_raw, nan=0.0, posinf=0.0, neginf=0.0), "rms").mean().detach()
        # non-finite tangent: skip the whole step (zero loss and gradient; the trainer skips the update on every
        # rank when any rank reports skip_step > 0) and count it.  The metric names never vary between ranks.
        # The one host read of the objective: a zero loss (exactly zero gradients) replaces the loss on the host.
        skip = not bool(out.finite.all())
        ctx.skip_update = ctx.skip_update or skip
        self.skipped_steps += int(skip)
        ctx.metrics["skip_step"] = max(float(skip), ctx.metrics.get("skip_step", 0.0))
        ctx.metrics[f"{self.name}/nonfinite_tangents"] = (~out.finite).sum()
        ctx.metrics[f"{self.name}/skipped_steps"] = float(self.skipped_steps)
        if skip:
            return {self.name: _zero_loss(model, out.loss)}
        return {self.name: cfg.weight * out.loss.mean()}


@register_objective("sct", SCMConfig)
class SCTLoss(_SCMBase):
    """sCT: continuous-time consistency training, dx_t/dt = cos t z - sin t x0 (Lu & Song 2025, Alg. 1)."""

    name = "sct"


@register_objective("scd", SCMConfig)
class SCDLoss(_SCMBase):
    """sCD: continuous-time consistency distillation, dx_t/dt = sigma_d F_teacher (Lu & Song 2025, Alg. 1)."""

    name = "scd"
    needs_teacher = True
    init_from_teacher = True  # the student starts as the teacher's EMA with a fresh logvar head

    def velocity(self, model, x0, z, t, batch: Batch, ctx: StepContext) -> torch.Tensor | None:
        if ctx.teacher is None:
            raise ValueError("objective 'scd' needs a teacher checkpoint (--teacher DIR)")
        return scm_velocity_scd(ctx.teacher, trigflow.diffuse(x0, z, t), t, batch.y)


def init_student_from_teacher(student: nn.Module, teacher: nn.Module) -> nn.Module:
    """sCD initialisation: copy the teacher's (EMA) weights into the student and re-initialise its logvar head."""
    sd = {k: v for k, v in teacher.state_dict().items() if not k.startswith("logvar_head.")}
    own = {k: v for k, v in student.state_dict().items() if not k.startswith("logvar_head.")}
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    wrong = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"student and teacher architectures differ (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shapes {wrong[:5]}); sCD needs the same architecture")
    student.load_state_dict(sd, strict=False)
    head = getattr(student, "logvar_head", None)
    if head is not None:
        nn.init.zeros_(head.linear.weight)
        nn.init.zeros_(head.linear.bias)
    return student


__all__ = [
    "SCDLoss",
    "SCMConfig",
    "SCMStep",
    "SCTLoss",
    "LinearisedLayers",
    "forward_ad_jvp",
    "init_student_from_teacher",
    "normalize_tangent",
    "per_sample_norm",
    "scm_per_sample_loss",
    "scm_step",
    "scm_tangent",
    "scm_velocity_scd",
    "scm_velocity_sct",
    "trigflow_jvp",
    "warmup_ratio",
]
