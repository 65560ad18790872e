"""Pure sampler functions.  Each takes its starting sample already scaled (sigma_max * eps for the EDM
samplers, sigma_d * eps for the consistency sampler), a `torch.Generator` where it needs randomness,
and returns the final sample.  No global RNG, no progress bars."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .trigflow import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, consistency_times, rho_interp

Denoiser = Callable[..., torch.Tensor]  # denoiser(x_sigma [B,...], sigma [B], class_labels?) -> x0_hat
# callback({"i", "x", "sigma", "sigma_next", "denoised"}) after every step (k-diffusion style): diagnostics
# observe a solve instead of re-implementing it.  The consistency sampler reports times "t" instead of sigmas.
Callback = Callable[[dict], None]


def karras_sigmas(
    n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = 7.0, device=None
) -> torch.Tensor:
    """EDM time steps (Karras et al. 2022, Eq. 5): n decreasing sigmas from sigma_max to sigma_min, then 0.  [n+1]"""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    sig = rho_interp(sigma_max, sigma_min, ramp, rho)
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)]).to(device=device, dtype=torch.float32)


def _call(denoiser: Denoiser, x: torch.Tensor, sigma: float | torch.Tensor, class_labels) -> torch.Tensor:
    s = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
    return denoiser(x, s) if class_labels is None else denoiser(x, s, class_labels)


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, class_labels=None,
                callback: Callback | None = None) -> torch.Tensor:
    """Deterministic 2nd-order Heun sampler (EDM, Karras et al. 2022, Algorithm 2)."""
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _call(denoiser, x, s, class_labels)
        d = (x - denoised) / s  # dx/dsigma
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d_next = (x_next - _call(denoiser, x_next, s_next, class_labels)) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d_next)
        x = x_next
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": denoised})
    return x


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, class_labels=None,
                 callback: Callback | None = None) -> torch.Tensor:
    """1st-order Euler solve of the EDM probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma."""
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _call(denoiser, x, s, class_labels)
        x = x + (s_next - s) * (x - denoised) / s
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": denoised})
    return x


@torch.no_grad()
def sample_sde(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, class_labels=None, generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE dx = -2 sigma * score dsigma + sqrt(2 sigma) dw (CDM's backward sampler);
    the last step to sigma = 0 is a noise-free denoise."""
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = _call(denoiser, x, s, class_labels)
        if s_next == 0:
            x = x0
        else:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + 2 * (s_next - s) * (x - x0) / s + math.sqrt(2 * abs(s - s_next) * s) * noise
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": x0})
    return x


def _consistency_fn(model) -> Callable[..., torch.Tensor]:
    return model.consistency if hasattr(model, "consistency") else model


@torch.no_grad()
def sample_consistency(
    model,
    noise: torch.Tensor,
    steps: int = 1,
    ts: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    class_labels: torch.Tensor | None = None,
    extra_noise: Sequence[torch.Tensor] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """sCM multistep consistency sampling (Lu & Song 2025, Alg. 1): x0 = f(z, t_0); x = cos t_k x0 + sin t_k z_k; ...

    `model` is a TrigFlowModel (its `consistency` is used) or a callable f(x_t, t [B], class_labels) -> x0.
    `noise` is x at ts[0], already scaled (sigma_d * eps).  Later steps take extra_noise[k-1] (sigma_d-scaled)
    when given, else fresh sigma_d * N(0, I) draws from `generator`.
    """
    sigma_data = float(getattr(model, "sigma_data", SIGMA_DATA))
    ts = list(ts) if ts is not None else consistency_times(steps, sigma_data=sigma_data)
    if extra_noise is not None and len(extra_noise) < len(ts) - 1:
        raise ValueError(f"extra_noise has {len(extra_noise)} tensors; {len(ts) - 1} needed for {len(ts)} steps")
    f = _consistency_fn(model)
    x = noise  # [B, ...] at ts[0]
    x0 = x
    for k, t in enumerate(ts):
        if k > 0:
            z = extra_noise[k - 1] if extra_noise is not None else sigma_data * torch.randn(
                x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            tk = torch.tensor(t, dtype=x0.dtype)
            x = torch.cos(tk) * x0 + torch.sin(tk) * z
        tb = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
        x0 = f(x, tb, class_labels)
        if callback is not None:
            callback({"i": k, "x": x, "t": float(t), "denoised": x0})
    return x0


def heun_teacher_sample(model, noise: torch.Tensor, num_steps: int = 18, class_labels=None) -> torch.Tensor:
    """Teacher sampling through the EDM view: `noise` is standard normal eps; 2*num_steps-1 NFE Heun.  Also the
    reference PF-ODE solution of the Direct-CM ODE error."""
    sigmas = karras_sigmas(num_steps, device=noise.device)
    return sample_heun(model.denoise, noise * sigmas[0], sigmas, class_labels=class_labels)


@torch.no_grad()
def one_step_sample(model, noise: torch.Tensor, class_labels=None) -> torch.Tensor:
    """A consistency model's 1-step sample in the EDM view from x = sigma_max eps (`noise` = eps, standard normal):
    its denoiser at sigma_max, i.e. the sCM 1-step sampler at t_max = arctan(sigma_max / sigma_d)."""
    sigma_max = karras_sigmas(1, device=noise.device)[0]
    return model.denoise(noise * sigma_max, sigma_max.expand(noise.shape[0]), class_labels)


def generate(model, sampler: str, noise: torch.Tensor, steps: int, *, class_labels=None,
             extra_noise: Sequence[torch.Tensor] | None = None, ts: Sequence[float] | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """How a model generates with `steps` steps from standard-normal `noise` (eps ~ N(0, I)): the one dispatch.

    sampler 'consistency' (a consistency model): sCM multistep sampling at `ts` (default: the model's 1-/2-step
    times), NFE = steps; the later steps' noise is `extra_noise` (standard normal, one tensor per later step) or
    drawn from `generator`.  sampler 'heun' (a diffusion model): deterministic EDM Heun over `steps` Karras
    steps, NFE = 2 steps - 1."""
    if sampler == "consistency":
        sd = model.sigma_data
        extra = None if not extra_noise else [sd * e for e in extra_noise]
        return sample_consistency(model, sd * noise, steps=steps, ts=ts, generator=generator,
                                  class_labels=class_labels, extra_noise=extra)
    if sampler == "heun":
        return heun_teacher_sample(model, noise, num_steps=steps, class_labels=class_labels)
    raise ValueError(f"sampler must be 'consistency' or 'heun', got {sampler!r}")


__all__ = [
    "generate",
    "karras_sigmas",
    "sample_consistency",
    "sample_euler",
    "sample_heun",
    "sample_sde",
    "heun_teacher_sample",
    "one_step_sample",
]
