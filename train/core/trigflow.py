"""TrigFlow <-> EDM conversions, training-time sampling and the time grid (sCM paper, Lu & Song 2025).

TrigFlow: x_t = cos t * x0 + sin t * z, z ~ N(0, sigma_d^2 I), t in [0, pi/2].
EDM view: sigma = sigma_d * tan t, x_sigma = x_t / cos t.
"""

from __future__ import annotations

import math

import torch

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
T_MID = 1.1  # intermediate time of the sCM 2-step sampler (radians)


def sigma_to_t(sigma: torch.Tensor | float, sigma_data: float = SIGMA_DATA) -> torch.Tensor | float:
    """EDM noise level -> TrigFlow time: t = arctan(sigma / sigma_d)."""
    if isinstance(sigma, torch.Tensor):
        return torch.atan(sigma / sigma_data)
    return math.atan(sigma / sigma_data)


def t_to_sigma(t: torch.Tensor | float, sigma_data: float = SIGMA_DATA) -> torch.Tensor | float:
    """TrigFlow time -> EDM noise level: sigma = sigma_d * tan t."""
    if isinstance(t, torch.Tensor):
        return sigma_data * torch.tan(t)
    return sigma_data * math.tan(t)


def t_max(sigma_max: float = SIGMA_MAX, sigma_data: float = SIGMA_DATA) -> float:
    """The largest time used by samplers: arctan(sigma_max / sigma_d) (~1.5645 for 80 / 0.5)."""
    return math.atan(sigma_max / sigma_data)


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] to broadcast against `like`."""
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


def x_t_to_x_sigma(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_sigma = x_t / cos t.  x_t: [B, ...], t: [B] or scalar."""
    return x_t / bcast(torch.cos(t), x_t)


def x_sigma_to_x_t(x_sigma: torch.Tensor, sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """x_t = x_sigma * cos t, with cos t = sigma_d / sqrt(sigma^2 + sigma_d^2)."""
    cos_t = sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    return x_sigma * bcast(cos_t, x_sigma)


def sample_training_t(
    n: int,
    p_mean: float,
    p_std: float,
    *,
    sigma_data: float = SIGMA_DATA,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training-time sampling: tau ~ N(P_mean, P_std^2), t = arctan(e^tau / sigma_d).  Returns [n]."""
    tau = torch.randn(n, generator=generator, device=device) * p_std + p_mean
    return torch.atan(torch.exp(tau) / sigma_data)


def diffuse(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Forward process x_t = cos t * x0 + sin t * z (z already scaled by sigma_d)."""
    return bcast(torch.cos(t), x0) * x0 + bcast(torch.sin(t), x0) * z


def velocity_target(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Conditional PF-ODE velocity v_t = cos t * z - sin t * x0."""
    return bcast(torch.cos(t), x0) * z - bcast(torch.sin(t), x0) * x0


def consistency_times(steps: int, sigma_max: float = SIGMA_MAX, sigma_data: float = SIGMA_DATA,
                      t_mid: float = T_MID) -> list[float]:
    """Default sCM sampling times: [t_max] for 1 step, [t_max, t_mid] for 2, a Karras-spaced grid beyond.
    A checkpoint may record its own times (`checkpoint.recorded_times`); samplers prefer those."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < t_mid < t_max(sigma_max, sigma_data):
        raise ValueError(f"t_mid must lie in (0, t_max = {t_max(sigma_max, sigma_data):.4f}), got {t_mid}")
    if steps == 1:
        return [t_max(sigma_max, sigma_data)]
    if steps == 2:
        return [t_max(sigma_max, sigma_data), float(t_mid)]
    smin = SIGMA_MIN * 100  # stop well above 0: the last step denoises anyway
    ramp = [i / (steps - 1) for i in range(steps)]
    return [math.atan(rho_interp(sigma_max, smin, r) / sigma_data) for r in ramp]


def rho_interp(start, end, ramp, rho: float = 7.0):
    """The EDM rho-schedule (Karras et al. 2022, Eq. 5) between `start` and `end` at `ramp` in [0, 1]:
    (start^(1/rho) + ramp (end^(1/rho) - start^(1/rho)))^rho.  Floats or broadcasting tensors."""
    return (start ** (1 / rho) + ramp * (end ** (1 / rho) - start ** (1 / rho))) ** rho
