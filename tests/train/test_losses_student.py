"""Students: sCT / sCD (train/losses/scm.py) and Direct CM / CD (train/losses/direct_cm.py).

Ground truth is analytic: for Gaussian data N(0, s^2 I) the PF-ODE maps x_t -> x_t s / a(t) with
a(t) = sqrt(cos^2 t s^2 + sin^2 t sigma_d^2), so the exact consistency function is f(x_t, t) = x_t s / a(t) and the
exact velocity is dx_t/dt = x_t a'(t) / a(t) = x_t cos t sin t (sigma_d^2 - s^2) / a(t)^2.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from quickstep.train.core import MLPConfig, ModelConfig, TrigFlowModel, build_model, trigflow
from quickstep.train.core.sampling import karras_sigmas, sample_consistency, sample_heun
from quickstep.train.data import GaussianMixture, gmm_preset
from quickstep.train.losses.base import Batch, StepContext
from quickstep.train.losses.direct_cm import (
    CDLoss,
    DirectCMConfig,
    DirectCMLoss,
    draw_levels,
    level_sigmas,
    ode_error,
    teacher_solve,
)
from quickstep.train.losses.scm import (
    SCDLoss,
    SCMConfig,
    SCTLoss,
    init_student_from_teacher,
    normalize_tangent,
    per_sample_norm,
    scm_step,
    scm_velocity_scd,
    trigflow_jvp,
    warmup_ratio,
)
from torch import nn

SD = 0.5  # sigma_d
S = 0.8  # data std of the Gaussian test distribution (!= sigma_d so that the velocity is not zero)


# ----------------------------------------------------------------------------------------------- analytic models
def _a(t: torch.Tensor, s: float) -> torch.Tensor:
    return torch.sqrt(torch.cos(t) ** 2 * s**2 + torch.sin(t) ** 2 * SD**2)


class GaussConsistencyNet(nn.Module):
    """Backbone F(x_in, t, y) of the exact consistency function f = x_t s / a(t) of N(0, s^2 I) data."""

    def __init__(self, s: float):
        super().__init__()
        self.s = s

    def forward(self, x_in, t, class_labels=None):
        x_t = x_in * SD
        tb = trigflow.bcast(t, x_t)
        f = x_t * self.s / _a(tb, self.s)
        return (torch.cos(tb) * x_t - f) / (SD * torch.sin(tb))  # F = (cos t x_t - f) / (sigma_d sin t)


class GaussVelocityNet(nn.Module):
    """Backbone of the exact PF-ODE: sigma_d F = dx_t/dt = x_t cos t sin t (sigma_d^2 - s^2) / a(t)^2."""

    def __init__(self, s: float):
        super().__init__()
        self.s = s

    def forward(self, x_in, t, class_labels=None):
        x_t = x_in * SD
        tb = trigflow.bcast(t, x_t)
        return x_t * torch.cos(tb) * torch.sin(tb) * (SD**2 - self.s**2) / _a(tb, self.s) ** 2 / SD


class GMMVelocityNet(nn.Module):
    """Backbone of a Gaussian mixture's exact PF-ODE: sigma_d F = velocity_trigflow (a perfect teacher)."""

    def __init__(self, gmm: GaussianMixture):
        super().__init__()
        self.gmm = gmm

    def forward(self, x_in, t, class_labels=None):
        return self.gmm.velocity_trigflow(x_in * SD, t, SD) / SD


def analytic_model(backbone: nn.Module, dim: int) -> TrigFlowModel:
    return TrigFlowModel(backbone, ModelConfig(MLPConfig(dim=dim), sigma_data=SD, logvar_channels=0))


def tiny_mlp(dim: int = 2, seed: int = 0, dropout: float = 0.0, perturb: float = 0.1, hidden: int = 32):
    """A small MLP TrigFlowModel whose zero-initialised layers are perturbed, so F is a generic function."""
    torch.manual_seed(seed)
    m = build_model(ModelConfig(MLPConfig(dim=dim, hidden=hidden, depth=2, dropout=dropout), sigma_data=SD))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.backbone.parameters():
            if float(p.abs().max()) == 0.0:
                p.copy_(perturb * torch.randn(p.shape, generator=g))
    return m


def ctx_for(batch: Batch, step: int = 0, total: int = 1, teacher=None, seed: int = 0) -> StepContext:
    return StepContext(step=step, total_steps=total, generator=torch.Generator().manual_seed(seed),
                       device=batch.x.device, teacher=teacher, global_batch=batch)


def gauss_draw(n: int, dim: int, seed: int, t_lo: float = 0.02, t_hi: float = 1.55):
    g = torch.Generator().manual_seed(seed)
    x0 = S * torch.randn(n, dim, generator=g, dtype=torch.float64)
    z = SD * torch.randn(n, dim, generator=g, dtype=torch.float64)
    t = t_lo + (t_hi - t_lo) * torch.rand(n, generator=g, dtype=torch.float64)
    return x0, z, t


# ----------------------------------------------------------------------------------------------- analytic truth
def test_analytic_gaussian_models_are_exact():
    """The closed forms themselves: f is the PF-ODE map (x_t / a(t) constant along the flow), v its derivative."""
    x0, z, t = gauss_draw(64, 3, 0)
    x_t = trigflow.diffuse(x0, z, t)
    f_model = analytic_model(GaussConsistencyNet(S), 3).double()
    v_model = analytic_model(GaussVelocityNet(S), 3).double()
    tb = t[:, None]
    torch.testing.assert_close(f_model.consistency(x_t, t), x_t * S / _a(tb, S))
    # d/dt (x_t / a(t)) = 0 along dx/dt = v  <=>  v = x_t a'/a ; a' by autograd
    tt = t.clone().requires_grad_(True)
    (da,) = torch.autograd.grad(_a(tt, S).sum(), tt)
    torch.testing.assert_close(v_model.velocity(x_t, t), x_t * (da / _a(t, S))[:, None])
    # f(x_t, t) at t -> 0 is the identity
    torch.testing.assert_close(f_model.consistency(x_t, torch.full_like(t, 1e-6)), x_t, atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------------------------- sCD tangent
def test_scd_tangent_vanishes_for_the_exact_consistency_function():
    x0, z, t = gauss_draw(512, 4, 1)
    teacher = analytic_model(GaussVelocityNet(S), 4).double()
    exact = analytic_model(GaussConsistencyNet(S), 4).double()
    wrong = analytic_model(GaussConsistencyNet(1.25 * S), 4).double()
    x_t = trigflow.diffuse(x0, z, t)
    dxdt = scm_velocity_scd(teacher, x_t, t)
    cfg = SCMConfig()
    good = scm_step(exact, x0, z, t, dxdt, cfg, r=1.0)
    bad = scm_step(wrong, x0, z, t, dxdt, cfg, r=1.0)
    g_good = per_sample_norm(good.g_raw, "rms")  # [B]
    g_bad = per_sample_norm(bad.g_raw, "rms")
    assert float(g_good.max()) < 1e-9, "the exact f must have a zero tangent for EVERY sample"
    assert float(good.mse.max()) < 1e-15 and float(good.loss.max()) < 1e-15  # logvar = 0: the minimum is 0
    assert float(g_bad.mean()) > 1e-2
    assert float(bad.loss.mean()) > 1e4 * float(good.loss.mean()) + 1e-4
    # with r < 1 (warm-up not finished) the exact function is NOT a fixed point: r matters
    mid = scm_step(exact, x0, z, t, dxdt, cfg, r=0.5)
    assert float(per_sample_norm(mid.g_raw, "rms").mean()) > 1e-2


def test_scd_tangent_with_finite_difference_jvp_also_vanishes():
    x0, z, t = gauss_draw(256, 2, 2, t_lo=0.05, t_hi=1.5)
    teacher = analytic_model(GaussVelocityNet(S), 2).double()
    exact = analytic_model(GaussConsistencyNet(S), 2).double()
    dxdt = scm_velocity_scd(teacher, trigflow.diffuse(x0, z, t), t)
    out = scm_step(exact, x0, z, t, dxdt, SCMConfig(jvp="finite_difference"), r=1.0)
    assert float(per_sample_norm(out.g_raw, "rms").max()) < 1e-6


# ----------------------------------------------------------------------------------------------- sCT tangent
def _posterior_draws(x_t: torch.Tensor, t: float, m: int, seed: int):
    """x0 ~ p(x0 | x_t) for N(0, S^2 I) data, and the matching z = (x_t - cos t x0) / sin t.  x_t: [P, D]."""
    g = torch.Generator().manual_seed(seed)
    c, s_ = math.cos(t), math.sin(t)
    a2 = c**2 * S**2 + s_**2 * SD**2
    mean = c * S**2 * x_t / a2  # [P, D]
    std = S * s_ * SD / math.sqrt(a2)
    x0 = mean[None] + std * torch.randn((m, *x_t.shape), generator=g, dtype=torch.float64)  # [M, P, D]
    z = (x_t[None] - c * x0) / s_
    return x0.reshape(-1, x_t.shape[1]), z.reshape(-1, x_t.shape[1])


@pytest.mark.parametrize("t_val", [0.3, 0.9, 1.4])
def test_sct_tangent_is_unbiased_for_the_exact_function_and_biased_for_a_wrong_one(t_val):
    """E[g_sCT | x_t] = g_sCD with the exact velocity: 0 for the exact f, clearly non-zero for a wrong f."""
    dim, p, m = 3, 4, 4000
    g = torch.Generator().manual_seed(3)
    x_t = 0.7 * torch.randn(p, dim, generator=g, dtype=torch.float64)  # [P, D] fixed points
    x0, z = _posterior_draws(x_t, t_val, m, seed=4)
    t = torch.full((x0.shape[0],), t_val, dtype=torch.float64)
    torch.testing.assert_close(trigflow.diffuse(x0, z, t).reshape(m, p, dim), x_t.expand(m, p, dim))
    teacher = analytic_model(GaussVelocityNet(S), dim).double()
    dxdt = scm_velocity_scd(teacher, trigflow.diffuse(x0, z, t), t)
    chi2 = {}
    for name, s in (("exact", S), ("wrong", 1.5 * S)):
        model = analytic_model(GaussConsistencyNet(s), dim).double()
        sct = scm_step(model, x0, z, t, None, SCMConfig(), r=1.0).g_raw.reshape(m, p, dim)
        scd = scm_step(model, x0, z, t, dxdt, SCMConfig(), r=1.0).g_raw.reshape(m, p, dim)[0]  # [P, D]
        se = sct.std(0) / math.sqrt(m)  # [P, D]
        assert float(sct.std(0).min()) > 1e-3, "per-sample sCT tangents carry the conditional-velocity noise"
        assert float(((sct.mean(0) - scd) / se).abs().max()) < 4.5  # E[g_sCT | x_t] = g_sCD
        chi2[name] = float(((sct.mean(0) / se) ** 2).sum())  # ~ chi^2 with P*D = 12 dof when unbiased
    assert chi2["exact"] < 40.0, chi2  # averages to ~0
    assert chi2["wrong"] > 100.0, chi2  # clearly biased (p < 1e-15 under no bias)


# ----------------------------------------------------------------------------------------------- JVP
def test_torch_func_jvp_matches_finite_difference_of_the_same_tangent():
    model = tiny_mlp(dim=3, seed=5).double()
    g = torch.Generator().manual_seed(6)
    x_t = 0.5 * torch.randn(16, 3, generator=g, dtype=torch.float64)
    t = 0.05 + 1.45 * torch.rand(16, generator=g, dtype=torch.float64)
    v = torch.randn(16, 3, generator=g, dtype=torch.float64)
    F, jvp = trigflow_jvp(model, x_t, t, v)
    h = 1e-7  # a central difference of F along (dx/dt, 1), times cos t sin t (t-frequencies reach ~1e3)
    with torch.no_grad():
        fd = (model(x_t + h * v, t + h) - model(x_t - h * v, t - h)) / (2 * h)
    cs = (torch.cos(t) * torch.sin(t))[:, None]
    torch.testing.assert_close(F, model(x_t, t).detach())
    torch.testing.assert_close(jvp, cs * fd, rtol=1e-5, atol=1e-6)
    assert float(jvp.abs().mean()) > 1e-2  # a non-trivial derivative
    # the built-in finite-difference option agrees in float64 with a small step
    F2, jvp2 = trigflow_jvp(model, x_t, t, v, method="finite_difference", fd_eps=5e-8)
    torch.testing.assert_close(jvp2, jvp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(F2, F, rtol=1e-5, atol=1e-6)


def test_jvp_uses_no_gradient_and_the_current_weights():
    model = tiny_mlp(dim=2, seed=7)
    x_t, t, v = torch.randn(8, 2), torch.rand(8) + 0.1, torch.randn(8, 2)
    F, jvp = trigflow_jvp(model, x_t, t, v)
    assert not F.requires_grad and not jvp.requires_grad
    with torch.no_grad():
        model.backbone.fc_out.bias.add_(1.0)  # theta- follows the current weights (not a stale copy / EMA)
    F2, _ = trigflow_jvp(model, x_t, t, v)
    torch.testing.assert_close(F2, F + 1.0)


def test_finite_difference_jvp_shares_the_dropout_mask():
    model = tiny_mlp(dim=2, seed=8, dropout=0.5).double().train()
    x_t = torch.randn(64, 2, dtype=torch.float64)
    t = torch.full((64,), 0.8, dtype=torch.float64)
    v = torch.randn(64, 2, dtype=torch.float64)
    _, jvp = trigflow_jvp(model, x_t, t, v, method="finite_difference", fd_eps=1e-6)
    # with independent masks the difference quotient would be O(1) / 1e-6; with a shared mask it is O(1)
    assert float(jvp.abs().max()) < 1e3


# ----------------------------------------------------------------------------------------------- small pieces
def test_normalisation_warmup_and_config_validation():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(per_sample_norm(g, "l2"), torch.tensor([5.0, 0.0]))
    torch.testing.assert_close(per_sample_norm(g, "rms"), torch.tensor([5.0 / math.sqrt(2), 0.0]))
    torch.testing.assert_close(normalize_tangent(g, 0.1, "l2")[0], g[0] / 5.1)
    assert float(normalize_tangent(g, 0.1, "rms")[1].abs().max()) == 0.0
    assert warmup_ratio(0, 100) == 0.0 and warmup_ratio(50, 100) == 0.5 and warmup_ratio(500, 100) == 1.0
    assert warmup_ratio(0, 0) == 1.0
    assert SCMConfig(warmup_frac=0.1).horizon(2000) == 200 and SCMConfig(warmup_steps=7).horizon(2000) == 7
    with pytest.raises(ValueError, match="tangent_norm must be one of"):
        SCMConfig(tangent_norm="linf")
    with pytest.raises(ValueError, match="jvp must be one of"):
        SCMConfig(jvp="forward")
    with pytest.raises(ValueError, match="solver must be one of"):
        DirectCMConfig(solver="rk4")
    with pytest.raises(ValueError, match="num_levels"):
        DirectCMConfig(num_levels=1)
    with pytest.raises(ValueError, match=r"top_level_prob must be in \[0, 1\)"):
        DirectCMConfig(top_level_prob=1.0)


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5])
def test_direct_cm_level_draws_put_top_level_prob_on_level_0_and_the_rest_uniform(p):
    n = 18
    u = torch.rand(400_000, generator=torch.Generator().manual_seed(0))
    level = draw_levels(u, n, p)
    assert level.dtype == torch.int64 and int(level.min()) == 0 and int(level.max()) == n - 1
    freq = torch.bincount(level, minlength=n).double() / len(u)
    expected = torch.full((n,), (1 - p) / n, dtype=torch.float64)
    expected[0] += p
    torch.testing.assert_close(freq, expected, atol=4e-3, rtol=0)  # 4e-3 is > 5 binomial sds at this n
    if p == 0.0:  # the paper's uniform draw, unchanged: one uniform per sample
        torch.testing.assert_close(level, (u * n).long())
    edges = torch.tensor([0.0, 1.0 - 1e-7])
    assert draw_levels(edges, n, p).tolist() == [0, n - 1]


def test_prior_weight_and_adaptive_weighting():
    """loss = w(t) e^{-u} mse + u; the gradient reaches F_theta and the logvar head, never the tangent."""
    model = tiny_mlp(dim=2, seed=9)
    with torch.no_grad():
        model.logvar_head.linear.bias.fill_(0.3)
    x0, z = torch.randn(16, 2) * 0.5, torch.randn(16, 2) * 0.5
    t = torch.linspace(0.1, 1.5, 16)
    plain = scm_step(model, x0, z, t, None, SCMConfig(), r=1.0)
    prior = scm_step(model, x0, z, t, None, SCMConfig(prior_weight=True), r=1.0)
    torch.testing.assert_close(plain.loss, math.exp(-0.3) * plain.mse + 0.3)
    w = 1.0 / (SD * torch.tan(t))
    torch.testing.assert_close(prior.loss, w * math.exp(-0.3) * prior.mse + 0.3)
    plain.loss.mean().backward()
    assert model.logvar_head.linear.bias.grad is not None
    assert float(model.backbone.fc_out.weight.grad.abs().sum()) > 0


def test_objectives_via_step_context_and_nonfinite_guard():
    model = tiny_mlp(dim=2, seed=10)
    batch = Batch(gmm_preset("ring8").sample(32, torch.Generator().manual_seed(0)))
    ctx = ctx_for(batch, step=5, total=100)
    terms = SCTLoss(SCMConfig(weight=2.0))(model, batch, ctx)
    assert set(terms) == {"sct"} and torch.isfinite(terms["sct"])
    assert ctx.metrics["sct/r"] == pytest.approx(5 / 10) and ctx.metrics["skip_step"] == 0.0
    terms["sct"].backward()
    with pytest.raises(ValueError, match="needs a teacher"):
        SCDLoss(SCMConfig())(model, batch, ctx_for(batch))
    # a non-finite tangent: the step is skipped (zero gradient) and counted
    bad = tiny_mlp(dim=2, seed=10)
    x = batch.x.clone()
    x[3] = 3e38  # overflows float32 inside the network: a non-finite tangent for one sample
    obj = SCTLoss(SCMConfig())
    ctx = ctx_for(Batch(x))
    terms = obj(bad, Batch(x), ctx)
    assert ctx.metrics["skip_step"] == 1.0 and obj.skipped_steps == 1
    assert ctx.metrics["sct/nonfinite_tangents"] >= 1
    assert float(terms["sct"].detach()) == 0.0
    terms["sct"].backward()
    grads = [p.grad for p in bad.parameters() if p.grad is not None]
    assert grads and all(float(g.abs().sum()) == 0.0 for g in grads)


def test_student_init_from_teacher_copies_weights_and_resets_logvar():
    teacher = tiny_mlp(dim=2, seed=11)
    with torch.no_grad():
        teacher.logvar_head.linear.bias.fill_(2.0)
    student = init_student_from_teacher(build_model(teacher.config), teacher)
    x, t = torch.randn(4, 2), torch.rand(4)
    torch.testing.assert_close(student(x, t), teacher(x, t))
    assert float(student.logvar(t).detach().abs().max()) == 0.0
    other = build_model(ModelConfig(MLPConfig(dim=2, hidden=16, depth=1)))
    with pytest.raises(ValueError, match="same architecture"):
        init_student_from_teacher(other, teacher)


# ----------------------------------------------------------------------------------------------- Direct CM / CD
def _gmm_teacher(name: str = "ring8") -> tuple[GaussianMixture, TrigFlowModel]:
    gmm = gmm_preset(name)
    return gmm, analytic_model(GMMVelocityNet(gmm), gmm.dim)


def test_direct_cm_target_equals_core_heun_solution_from_the_same_point():
    teacher = tiny_mlp(dim=2, seed=12)
    sigmas = level_sigmas(10)
    g = torch.Generator().manual_seed(13)
    level = torch.tensor([0, 3, 9, 5, 3, 7])
    x_sigma = torch.randn(6, 2, generator=g) * sigmas[level][:, None]
    target = teacher_solve(teacher, x_sigma, level, sigmas)
    for i in range(6):
        ref = sample_heun(teacher.denoise, x_sigma[i : i + 1], sigmas[int(level[i]):])
        torch.testing.assert_close(target[i : i + 1], ref, rtol=1e-5, atol=1e-5)
    # the level-0 solve is the full EDM Heun sampler from sigma_max
    torch.testing.assert_close(target[:1], sample_heun(teacher.denoise, x_sigma[:1], karras_sigmas(10)),
                               rtol=1e-5, atol=1e-5)
    # CD: one solver step then the (stop-gradient) student at the next level
    nxt = teacher_solve(teacher, x_sigma, level.clamp(max=8), sigmas, stop=level.clamp(max=8) + 1)
    for i in range(6):
        n = min(int(level[i]), 8)
        ref = sample_heun(teacher.denoise, x_sigma[i : i + 1], sigmas[n : n + 2])
        torch.testing.assert_close(nxt[i : i + 1], ref, rtol=1e-5, atol=1e-5)


def test_direct_cm_loss_is_zero_for_the_exact_ode_map():
    """Gaussian data: the Heun target from a fine grid matches the exact map f = x_t s / a(t); loss ~ 0."""
    teacher = analytic_model(GaussVelocityNet(S), 2).double()
    student = analytic_model(GaussConsistencyNet(S), 2).double()
    batch = Batch(S * torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    # Gaussian-data PF-ODE in sigma is linear; the exact map needs a fine grid (Heun is 2nd order)
    cfg = DirectCMConfig(num_levels=200, sigma_max=20.0)
    ctx = ctx_for(batch, teacher=teacher)
    loss = DirectCMLoss(cfg)(student, batch, ctx)["direct_cm"]
    wrong = analytic_model(GaussConsistencyNet(1.25 * S), 2).double()
    loss_wrong = DirectCMLoss(cfg)(wrong, batch, ctx_for(batch, teacher=teacher))["direct_cm"]
    assert float(loss) < 1e-6 and float(loss_wrong) > 1e3 * float(loss)
    cd = CDLoss(cfg)(student, batch, ctx_for(batch, teacher=teacher))["cd"]
    assert float(cd) < 1e-8


# ----------------------------------------------------------------------------------------------- short runs
def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 64, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between equal-size point clouds [N, D]."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a.double() @ d, dim=0)
    pb, _ = torch.sort(b.double() @ d, dim=0)
    return float((pa - pb).square().mean().sqrt())


def _train(objective, model, gmm, steps, teacher=None, lr=2e-3, batch=256, seed=0, ema_rate=0.05):
    """A minimal loop around the real objective + StepContext: Adam with linear LR decay, an EMA copy."""
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    data_g = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        b = Batch(gmm.sample(batch, data_g))
        ctx = StepContext(step=step, total_steps=steps, generator=gen, device=b.x.device, teacher=teacher,
                          global_batch=b)
        loss = sum(objective(model, b, ctx).values())
        for group in opt.param_groups:
            group["lr"] = lr * (1 - step / steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not ctx.metrics.get("skip_step"):
            opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(p, ema_rate)
    return ema


def _quality(model, gmm, n=2000, seed=123):
    g = torch.Generator().manual_seed(seed)
    fresh = gmm.sample(n, g)
    noise = SD * torch.randn(n, gmm.dim, generator=g)
    extra = [SD * torch.randn(n, gmm.dim, generator=g)]
    one = sample_consistency(model, noise, steps=1)
    two = sample_consistency(model, noise, steps=2, extra_noise=extra)
    return sliced_wasserstein(one, fresh), sliced_wasserstein(two, fresh)


@pytest.mark.parametrize("kind", ["sct", "scd"])
def test_short_scm_run_improves_one_and_two_step_samples(kind, one_thread):
    """250 steps on the 8-Gaussian ring (sCD with the exact mixture PF-ODE as the teacher).

    Measured (sliced W2 to fresh data): init 0.71 -> 1-step ~0.06-0.09, 2-step ~0.08-0.13."""
    gmm, teacher = _gmm_teacher("ring8")
    torch.manual_seed(0)
    # time_scale 1: the t-embedding must be smooth for sCM (the core default 1000 makes the tangent blow up)
    model = build_model(ModelConfig(MLPConfig(dim=2, hidden=64, depth=2, time_scale=1.0), sigma_data=SD))
    before, _ = _quality(model, gmm)
    obj = SCTLoss(SCMConfig()) if kind == "sct" else SCDLoss(SCMConfig())
    ema = _train(obj, model, gmm, steps=250, teacher=teacher if kind == "scd" else None)
    one, two = _quality(ema, gmm)
    print(f"{kind}: sliced W2 init {before:.3f} -> 1-step {one:.3f}, 2-step {two:.3f}")
    assert one < 0.3 * before
    assert two < one + 0.08  # not worse than 1 step, up to ~10% of the initial distance


@pytest.mark.parametrize("kind", ["direct_cm", "cd"])
def test_short_direct_cm_and_cd_runs_reduce_ode_error_and_improve_samples(kind, one_thread):
    """The Direct-CM paper's two axes: ODE error to the teacher's Heun solve and sample quality (sliced W2)."""
    gmm, teacher = _gmm_teacher("ring8")
    torch.manual_seed(0)
    model = build_model(ModelConfig(MLPConfig(dim=2, hidden=64, depth=2, time_scale=1.0), sigma_data=SD))
    eps = torch.randn(512, 2, generator=torch.Generator().manual_seed(7))
    err0, (before, _) = ode_error(model, teacher, eps, heun_steps=12), _quality(model, gmm)
    cfg = DirectCMConfig(num_levels=12)
    obj = DirectCMLoss(cfg) if kind == "direct_cm" else CDLoss(cfg)
    ema = _train(obj, model, gmm, steps=150, teacher=teacher)
    err1, (one, two) = ode_error(ema, teacher, eps, heun_steps=12), _quality(ema, gmm)
    print(f"{kind}: ODE error {err0:.3f} -> {err1:.3f}; sliced W2 {before:.3f} -> 1-step {one:.3f}, 2-step {two:.3f}")
    assert err1 < 0.5 * err0
    assert one < 0.6 * before


# ----------------------------------------------------------------------------------------------- trainer hooks
STUDENT_PRESETS = [f"{d}-{k}" for d in ("gmm2d", "digits") for k in ("sct", "scd", "direct-cm", "cd")] + ["cifar10-scd"]


@pytest.mark.parametrize("name", STUDENT_PRESETS)
def test_student_presets_load(name):
    from quickstep.train.config import load_preset
    from quickstep.train.losses import get_objective_spec

    cfg = load_preset(name)
    (obj,) = cfg.objectives
    assert obj in ("sct", "scd", "direct_cm", "cd")
    assert get_objective_spec(obj).needs_teacher == (obj != "sct")


@pytest.mark.parametrize("fused", ["off", "on"])  # on: the skip is applied on the device (found_inf)
def test_trainer_scd_starts_from_the_teacher_ema_and_skips_nonfinite_steps(tmp_path, one_thread, fused):
    from quickstep.train.config import load_preset
    from quickstep.train.core.checkpoint import save_checkpoint
    from quickstep.train.loop import Trainer

    cfg = load_preset("gmm2d-scd", ["steps=3", "batch_size=32", "log.progress=false", "log.tensorboard=false",
                                    "log.samples=false", "data.options.n=256", f"optim.fused={fused}"])
    teacher = tiny_mlp(dim=2, seed=14, hidden=16)
    with torch.no_grad():
        teacher.logvar_head.linear.bias.fill_(1.5)
    save_checkpoint(tmp_path / "teacher", teacher)
    trainer = Trainer(cfg, tmp_path / "run", teacher=tmp_path / "teacher")
    assert trainer.device_guard == (fused == "on")
    x, t = torch.randn(5, 2), torch.rand(5) + 0.1
    torch.testing.assert_close(trainer.model(x, t), teacher(x, t))  # the teacher's architecture and weights
    assert float(trainer.model.logvar(t).detach().abs().max()) == 0.0  # a fresh logvar head
    assert all(p.requires_grad for p in trainer.model.parameters())
    out = trainer.train_step()
    assert out["skipped_steps"] == 0.0 and math.isfinite(out["scd"])
    # a non-finite tangent: the update is skipped and counted, training goes on
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    assert any(not torch.equal(v, before[k]) for k, v in ema_before.items())  # else the EMA check below is vacuous
    trainer.feed.data[:] = 3e38  # the in-memory set on the device (float for the mixtures)
    out = trainer.train_step()
    assert out["skipped_steps"] == 1.0 and out["skip_step"] == 1.0
    for k, v in trainer.model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    for k, v in trainer.ema.state_dict().items():  # the EMA does not move on a skipped step either
        assert torch.equal(v, ema_before[k]), k
