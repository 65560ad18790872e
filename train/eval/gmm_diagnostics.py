"""Exact diagnostics on Gaussian mixtures, where the true score, denoiser and density are known in closed form
(`quickstep.train.data.GaussianMixture`).  Everything is reported per sigma band (EDM view, sigma = sigma_d tan t):

- score error   E ||s_theta(x_sigma, sigma) - s*(x_sigma, sigma)||^2 (and the dimensionless sigma^2-scaled mean
  per coordinate, = ||D_theta - D*||^2 / (sigma^2 D));
- score-FPE residual (FP-Diffusion, Lai et al. 2023): r = d_sigma s - sigma grad_x(div s + ||s||^2), exact
  divergence, reported as E[sigma^4 mean_d r^2] (dimensionless), via `losses.fp.fpe_residual`;
- CP violation (Consistent Diffusion Models, Daras et al. 2023): ||E[D(x_sigma'; sigma') | x_sigma] - D(x_sigma; sigma)||^2
  per coordinate, with the model's own reverse-SDE chains (`losses.cp.reverse_sde_chain`) and the unbiased
  U-statistic over M independent chains (M = 2 is CDM's product estimator);
- STF vs DSM target variance (Stable Target Field, Xu et al. 2023): E||x0 - D*||^2 (the DSM target's variance
  around the true posterior mean: the trace of Cov[x0 | x_sigma]) against E||y_hat_STF - D*||^2 with a
  reference batch of R samples containing the batch (`losses.stf.stf_targets`);
- sample quality against the true density: mean log p(x) of samples, sliced Wasserstein-2 and RBF MMD^2 to fresh
  true samples, each with the value a true sample of the same size gets (the noise floor);
- the exact consistency map Phi*(x_t, t): the PF-ODE solved to t = 0 with the analytic denoiser (adaptive
  DOP853, float64), and a consistency model's error E||f_theta(x_t, t) - Phi*(x_t, t)||^2 per band
  (`consistency_map_error`): where in t a student is wrong, and whether it converges.

`exact_model(mixture)` wraps the analytic PF-ODE velocity into a real `TrigFlowModel` (so every view --
denoise, score, velocity, consistency -- comes from train.core); `perturb=` adds a smooth error to F.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.model import TrigFlowModel
from ..core.networks import MLPConfig, ModelConfig
from ..core.trigflow import SIGMA_DATA, sigma_to_t, t_to_sigma, x_sigma_to_x_t, x_t_to_x_sigma
from ..data import GaussianMixture
from .metrics import mmd_rbf, sliced_wasserstein

DEFAULT_BANDS: tuple[float, ...] = (0.002, 0.02, 0.1, 0.3, 1.0, 3.0, 10.0, 80.0)


# ----------------------------------------------------------------------------------------------- exact model
class ExactMixtureBackbone(nn.Module):
    """F*(x_in, t) = v*(sigma_d x_in, t) / sigma_d with the mixture's exact PF-ODE velocity (float64 inside);
    `perturb` > 0 adds perturb * sin(3 x_in) rolled by one coordinate (a smooth, non-conservative error)."""

    def __init__(self, mixture: GaussianMixture, sigma_data: float = SIGMA_DATA, perturb: float = 0.0):
        super().__init__()
        self.mixture = mixture
        self.sigma_data = float(sigma_data)
        self.perturb = float(perturb)

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        v = self.mixture.velocity_trigflow(x_in.to(torch.float64) * self.sigma_data, t.to(torch.float64),
                                           self.sigma_data)  # [B, D]
        f = v / self.sigma_data
        if self.perturb:
            f = f + self.perturb * torch.sin(3.0 * x_in.to(torch.float64)).roll(1, dims=-1)
        return f.to(x_in.dtype)


def exact_model(mixture: GaussianMixture, *, sigma_data: float = SIGMA_DATA, perturb: float = 0.0) -> TrigFlowModel:
    """A TrigFlowModel whose network is the mixture's exact F* (plus an optional perturbation); no parameters."""
    cfg = ModelConfig(backbone=MLPConfig(dim=mixture.dim), sigma_data=sigma_data, logvar_channels=0)
    return TrigFlowModel(ExactMixtureBackbone(mixture, sigma_data, perturb), cfg).eval()


# ----------------------------------------------------------------------------------------------- helpers
def _bands(edges: tuple[float, ...]) -> list[tuple[float, float]]:
    if len(edges) < 2 or any(b <= a for a, b in zip(edges[:-1], edges[1:], strict=False)) or edges[0] <= 0:
        raise ValueError(f"sigma band edges must be >= 2 increasing positive numbers, got {edges}")
    return list(zip(edges[:-1], edges[1:], strict=False))


def _log_uniform(lo: float, hi: float, n: int, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))  # [n]


def _f64(model: TrigFlowModel) -> TrigFlowModel:
    """A float64 copy of the model: the diagnostics difference scores at sigma down to 0.002, where float32
    round-off in (D - x) / sigma^2 would dominate the finite differences."""
    return copy.deepcopy(model).to(torch.float64).eval()


def _noisy(mixture: GaussianMixture, lo: float, hi: float, n: int, g: torch.Generator):
    x0 = mixture.sample(n, g, dtype=torch.float64)  # [n, D]
    sigma = _log_uniform(lo, hi, n, g)  # [n]
    x = x0 + sigma[:, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return x0, x, sigma


@dataclass(frozen=True)
class BandValue:
    """One diagnostic in one sigma band: the mean, its standard error and the number of samples."""

    sigma_lo: float
    sigma_hi: float
    mean: float
    stderr: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"sigma_lo": self.sigma_lo, "sigma_hi": self.sigma_hi, "mean": self.mean, "stderr": self.stderr,
                "n": self.n}


def _band_value(lo: float, hi: float, per: torch.Tensor) -> BandValue:
    per = per.detach().to(torch.float64)
    se = float(per.std() / math.sqrt(per.numel())) if per.numel() > 1 else 0.0
    return BandValue(lo, hi, float(per.mean()), se, int(per.numel()))


# ----------------------------------------------------------------------------------------------- score error
def score_error(model: TrigFlowModel, mixture: GaussianMixture, *, bands: tuple[float, ...] = DEFAULT_BANDS,
                n: int = 2048, generator: torch.Generator | None = None, normalized: bool = True) -> list[BandValue]:
    """Per band: E sigma^2/D ||s_theta - s*||^2 (normalized, dimensionless) or E ||s_theta - s*||^2."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    model, dt = _f64(model), torch.float64
    out = []
    for lo, hi in _bands(bands):
        _, x, sigma = _noisy(mixture, lo, hi, n, g)
        with torch.no_grad():
            s_model = model.edm_score(x.to(dt), sigma.to(dt)).to(torch.float64)
        err = (s_model - mixture.score(x, sigma)).square().sum(1)  # [n]
        if normalized:
            err = err * sigma**2 / mixture.dim
        out.append(_band_value(lo, hi, err))
    return out


# ----------------------------------------------------------------------------------------------- FPE residual
def fpe_residual(model: TrigFlowModel, mixture: GaussianMixture, *, bands: tuple[float, ...] = DEFAULT_BANDS,
                 n: int = 512, generator: torch.Generator | None = None, h_rel: float = 1e-3) -> list[BandValue]:
    """Per band: E[sigma^4 mean_d r^2] of the score-FPE residual (exact divergence), through `losses.fp`."""
    from ..losses.fp import fpe_residual as _residual

    g = generator if generator is not None else torch.Generator().manual_seed(0)
    model, dt = _f64(model), torch.float64
    out = []
    for lo, hi in _bands(bands):
        _, x, sigma = _noisy(mixture, lo, hi, n, g)
        r = _residual(model.edm_score, x.to(dt), sigma.to(dt), h_rel=h_rel, probe=None, create_graph=False)
        per = sigma**4 * r.detach().to(torch.float64).square().mean(1)  # [n]
        out.append(_band_value(lo, hi, per))
    return out


# ----------------------------------------------------------------------------------------------- CP violation
def cp_violation(model: TrigFlowModel, mixture: GaussianMixture, *, bands: tuple[float, ...] = DEFAULT_BANDS,
                 n: int = 256, chains: int = 8, drift: float = 0.5, chain_steps: int = 16,
                 generator: torch.Generator | None = None) -> list[BandValue]:
    """Per band: ||E[D(x'; sigma') | x] - D(x; sigma)||^2 / D with sigma' = (1 - drift) sigma, estimated from
    `chains` independent reverse-SDE chains of the model itself (unbiased U-statistic; may be < 0 by noise).

    The exact model has zero violation up to the Euler-Maruyama error of `chain_steps` steps."""
    from ..losses.cp import edm_grid, reverse_sde_chain

    if chains < 2 or not 0 < drift < 1:
        raise ValueError(f"need chains >= 2 and 0 < drift < 1, got chains={chains}, drift={drift}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    model, dt = _f64(model), torch.float64
    out = []
    for lo, hi in _bands(bands):
        _, x, sigma = _noisy(mixture, lo, hi, n, g)
        x, sigma = x.to(dt), sigma.to(dt)
        sigma_next = sigma * (1 - drift)
        grid = edm_grid(sigma, sigma_next, chain_steps)  # [S+1, n]
        xs = x.repeat(chains, 1)  # [M n, D]
        grid_m = grid.repeat(1, chains)  # [S+1, M n]
        noise = torch.randn((chain_steps, *xs.shape), generator=g, dtype=torch.float64).to(dt)
        with torch.no_grad():
            ends = reverse_sde_chain(model.denoise, xs, grid_m, noise)  # [M n, D]
            d_end = model.denoise(ends, sigma_next.repeat(chains)).to(torch.float64).reshape(chains, n, -1)
            d_x = model.denoise(x, sigma).to(torch.float64)  # [n, D]
        dev = d_end - d_x[None]  # [M, n, D]
        total = dev.sum(0).square().sum(-1)  # [n]
        diag = dev.square().sum(-1).sum(0)  # [n]
        per = (total - diag) / (chains * (chains - 1)) / mixture.dim  # unbiased ||mean dev||^2 / D
        out.append(_band_value(lo, hi, per))
    return out


# ----------------------------------------------------------------------------------------------- consistency map
SIGMA_END = 1e-7  # the map integrates the EDM PF-ODE down to this sigma, then applies D* (error O(SIGMA_END^2))


def exact_consistency_map(mixture: GaussianMixture, x_t: torch.Tensor, t: torch.Tensor, *,
                          sigma_data: float = SIGMA_DATA, rtol: float = 1e-10, atol: float = 1e-12) -> torch.Tensor:
    """Phi*(x_t, t): the end point at t = 0 of the exact PF-ODE through (x_t, t)  [B, D] (float64).

    Solved in the EDM view (x_sigma = x_t / cos t, sigma = sigma_d tan t, `train.core.trigflow`):
    dx/d(log sigma) = x - D*(x; sigma), with every sample on its own log-sigma path from log sigma_i to
    log SIGMA_END reparametrised onto s in [0, 1], so one adaptive DOP853 solve (scipy, float64) handles a batch
    of different start times; the end point is denoised once more with D* (x_0 = D*(x_sigma_end) + O(sigma_end^2)).
    Accuracy: against the closed form of a single Gaussian ~1e-9 (tests/train/test_consistency_map.py)."""
    import numpy as np
    from scipy.integrate import solve_ivp

    x_t = torch.as_tensor(x_t, dtype=torch.float64)
    if x_t.ndim != 2 or x_t.shape[1] != mixture.dim:
        raise ValueError(f"x_t must have shape [B, {mixture.dim}], got {list(x_t.shape)}")
    t = torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0]).clone()
    if bool(((t <= 0) | (t >= math.pi / 2)).any()):
        raise ValueError("t must lie in (0, pi/2)")
    b, d = x_t.shape
    x_sigma = x_t_to_x_sigma(x_t, t)  # [B, D]
    sigma = t_to_sigma(t, sigma_data)  # [B]
    log_lo = math.log(SIGMA_END)
    log_start = torch.log(sigma).clamp(min=log_lo)  # [B]
    span = (log_lo - log_start).numpy()  # [B] (<= 0)

    def rhs(s: float, y: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(y.reshape(b, d))
        sig = torch.exp(log_start + s * torch.from_numpy(span))  # [B]
        dx = (x - mixture.denoise(x, sig)) * torch.from_numpy(span)[:, None]  # dx/ds
        return dx.reshape(-1).numpy()

    sol = solve_ivp(rhs, (0.0, 1.0), x_sigma.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"exact consistency map: the ODE solve failed ({sol.message})")
    x_end = torch.from_numpy(sol.y[:, -1].reshape(b, d))
    return mixture.denoise(x_end, SIGMA_END)


class ConsistencyMapProbe:
    """A fixed set of noisy points per sigma band with their exact Phi*, solved once; calling the probe on a
    consistency model returns E ||f_theta(x_t, t) - Phi*(x_t, t)||^2 (summed over coordinates) per band, at the
    cost of one forward pass -- cheap enough for every log interval of a training run."""

    def __init__(self, mixture: GaussianMixture, *, sigma_data: float = SIGMA_DATA,
                 bands: tuple[float, ...] = DEFAULT_BANDS, n: int = 512, generator: torch.Generator | None = None):
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        self.sigma_data = float(sigma_data)
        self.points: list[tuple[float, float, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for lo, hi in _bands(bands):
            _, x, sigma = _noisy(mixture, lo, hi, n, g)
            t = sigma_to_t(sigma, self.sigma_data)  # [n]
            x_t = x_sigma_to_x_t(x, sigma, self.sigma_data)  # [n, D]
            self.points.append((lo, hi, x_t, t, exact_consistency_map(mixture, x_t, t, sigma_data=self.sigma_data)))

    @torch.no_grad()
    def __call__(self, model) -> list[BandValue]:
        """`model`: a TrigFlowModel (its `consistency`, in eval mode) or a callable f(x_t, t)."""
        if float(getattr(model, "sigma_data", self.sigma_data)) != self.sigma_data:
            raise ValueError(f"the probe was built for sigma_data {self.sigma_data}, the model has {model.sigma_data}")
        f = model.consistency if hasattr(model, "consistency") else model
        was_training = bool(getattr(model, "training", False))
        p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        dev, dt = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
        if was_training:
            model.eval()
        try:
            out = []
            for lo, hi, x_t, t, target in self.points:
                pred = f(x_t.to(dev, dt), t.to(dev, dt)).to("cpu", torch.float64)
                out.append(_band_value(lo, hi, (pred - target).square().sum(1)))
        finally:
            if was_training:
                model.train()
        return out


def consistency_map_error(model, mixture: GaussianMixture, *, bands: tuple[float, ...] = DEFAULT_BANDS,
                          n: int = 512, generator: torch.Generator | None = None) -> list[BandValue]:
    """Per sigma band (t = arctan(sigma / sigma_d)): E ||f_theta(x_t, t) - Phi*(x_t, t)||^2 (summed over
    coordinates) for x_t from the forward process (`ConsistencyMapProbe`, built and used once)."""
    sd = float(getattr(model, "sigma_data", SIGMA_DATA))
    return ConsistencyMapProbe(mixture, sigma_data=sd, bands=bands, n=n, generator=generator)(model)


def map_error_scalars(values: list[BandValue], prefix: str = "map_err") -> dict[str, float]:
    """Flat `{prefix}/sigma_<lo>-<hi>: mean, ..., prefix/mean: mean over bands}` for logs (TensorBoard)."""
    out = {f"{prefix}/sigma_{v.sigma_lo:g}-{v.sigma_hi:g}": v.mean for v in values}
    out[f"{prefix}/mean"] = float(sum(v.mean for v in values) / max(len(values), 1))
    return out


# ----------------------------------------------------------------------------------------------- STF variance
@dataclass(frozen=True)
class TargetVariance:
    """DSM vs STF target error around the exact posterior mean in one sigma band (per coordinate)."""

    sigma_lo: float
    sigma_hi: float
    dsm_var: float  # E ||x0 - D*||^2 / D  (= E tr Cov[x0 | x_sigma] / D)
    stf_mse: float  # E ||y_hat - D*||^2 / D  (variance + bias^2 of the STF target)
    ratio: float  # stf_mse / dsm_var

    def to_dict(self) -> dict[str, float]:
        return {"sigma_lo": self.sigma_lo, "sigma_hi": self.sigma_hi, "dsm_var": self.dsm_var,
                "stf_mse": self.stf_mse, "ratio": self.ratio}


def stf_target_variance(mixture: GaussianMixture, *, ref_batch: int = 1024, batch: int = 256,
                        bands: tuple[float, ...] = DEFAULT_BANDS, repeats: int = 4,
                        generator: torch.Generator | None = None) -> list[TargetVariance]:
    """STF's claim, measured exactly: the reference-batch target has lower error than the DSM target x0 at
    intermediate sigma (the reference batch holds the minibatch plus ref_batch - batch fresh samples)."""
    from ..losses.stf import stf_targets

    if ref_batch < batch:
        raise ValueError(f"ref_batch ({ref_batch}) must include the batch ({batch})")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    out = []
    for lo, hi in _bands(bands):
        dsm, stf = [], []
        for _ in range(repeats):
            x0, x, sigma = _noisy(mixture, lo, hi, batch, g)
            refs = torch.cat([x0, mixture.sample(ref_batch - batch, g, dtype=torch.float64)])
            d_star = mixture.denoise(x, sigma)  # [B, D]
            y_hat = stf_targets(x.float(), sigma.float(), refs.float()).to(torch.float64)
            dsm.append((x0 - d_star).square().mean(1))
            stf.append((y_hat - d_star).square().mean(1))
        dv, sm = float(torch.cat(dsm).mean()), float(torch.cat(stf).mean())
        out.append(TargetVariance(lo, hi, dv, sm, sm / dv if dv > 0 else float("nan")))
    return out


# ----------------------------------------------------------------------------------------------- sample quality
@dataclass(frozen=True)
class SampleQuality:
    """Samples against the true density, with a true sample of the same size as the reference floor."""

    log_likelihood: float  # mean log p(x) of the samples under the true mixture
    sliced_w2: float
    mmd: float
    true_log_likelihood: float  # the same three for a fresh true sample (what a perfect model gets)
    true_sliced_w2: float
    true_mmd: float
    n: int
    sliced_w1: float = float("nan")  # sliced W1 (same 256 directions), and its floor
    true_sliced_w1: float = float("nan")

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def sample_quality(samples: torch.Tensor, mixture: GaussianMixture, *,
                   generator: torch.Generator | None = None) -> SampleQuality:
    """Log-likelihood under the true density, sliced W2 and RBF MMD^2 against fresh true samples [N, D]."""
    if samples.ndim != 2 or samples.shape[1] != mixture.dim:
        raise ValueError(f"samples must have shape [N, {mixture.dim}], got {list(samples.shape)}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    n = samples.shape[0]
    x = samples.detach().cpu().to(torch.float64)
    ref = mixture.sample(n, g, dtype=torch.float64)
    floor = mixture.sample(n, g, dtype=torch.float64)
    sw_g = torch.Generator().manual_seed(1)
    return SampleQuality(
        log_likelihood=float(mixture.log_prob(x).mean()),
        sliced_w2=sliced_wasserstein(x, ref, generator=sw_g),
        mmd=mmd_rbf(x, ref),
        true_log_likelihood=float(mixture.log_prob(floor).mean()),
        true_sliced_w2=sliced_wasserstein(floor, ref, generator=torch.Generator().manual_seed(1)),
        true_mmd=mmd_rbf(floor, ref),
        n=n,
        sliced_w1=sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(1), p=1),
        true_sliced_w1=sliced_wasserstein(floor, ref, generator=torch.Generator().manual_seed(1), p=1),
    )


__all__ = [
    "DEFAULT_BANDS",
    "BandValue",
    "ConsistencyMapProbe",
    "ExactMixtureBackbone",
    "SampleQuality",
    "TargetVariance",
    "consistency_map_error",
    "cp_violation",
    "exact_consistency_map",
    "exact_model",
    "map_error_scalars",
    "fpe_residual",
    "sample_quality",
    "score_error",
    "stf_target_variance",
]
