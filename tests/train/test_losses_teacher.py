"""Analytic checks of the teacher regularisers on a Gaussian mixture whose exact denoiser/score stand in for
the network, and of the objective composition."""

from __future__ import annotations

import math

import pytest
import torch
from quickstep.train.data import gmm_preset
from quickstep.train.losses import OBJECTIVES, Batch, StepContext, build_objective
from quickstep.train.losses.cp import cp_estimate, edm_grid
from quickstep.train.losses.fp import divergence, fpe_residual, fpe_terms
from quickstep.train.losses.stf import stf_targets

MIX = gmm_preset("ring8")


def _exact_denoise(x, sigma, labels=None):
    return MIX.denoise(x, sigma)


def _shifted_denoise(x, sigma, labels=None):
    """Breaks the consistency property: a shift growing with sigma."""
    return MIX.denoise(x, sigma) + 0.5 * sigma[:, None]


def _noisy(n: int, sigma: float, g: torch.Generator):
    x0 = MIX.sample(n, g, dtype=torch.float64)
    s = torch.full((n,), sigma, dtype=torch.float64)
    return x0, x0 + s[:, None] * torch.randn(n, 2, generator=g, dtype=torch.float64), s


# ----------------------------------------------------------------------------------------------- CP
def test_edm_grid_endpoints_and_monotone():
    s, sn = torch.tensor([1.0, 0.3]), torch.tensor([0.95, 0.002])
    grid = edm_grid(s, sn, 5)
    assert grid.shape == (6, 2)
    torch.testing.assert_close(grid[0], s)
    torch.testing.assert_close(grid[-1], sn)
    assert bool((grid[1:] < grid[:-1]).all())


def test_cp_is_zero_for_exact_denoiser_and_positive_for_a_perturbed_one():
    g = torch.Generator().manual_seed(0)
    n, steps = 8000, 6
    xs, ss = zip(*[_noisy(n, sigma, g)[1:] for sigma in (0.2, 1.5)], strict=True)
    x, s = torch.cat(xs), torch.cat(ss)
    delta = 0.5 * torch.rand(2 * n, generator=g, dtype=torch.float64)  # a long horizon makes the bias visible
    n1 = torch.randn(steps, 2 * n, 2, generator=g, dtype=torch.float64)
    n2 = torch.randn(steps, 2 * n, 2, generator=g, dtype=torch.float64)
    exact = cp_estimate(_exact_denoise, x, s, delta, n1, n2, chain_steps=steps)
    bad = cp_estimate(_shifted_denoise, x, s, delta, n1, n2, chain_steps=steps)
    se_exact, se_bad = exact.std() / math.sqrt(2 * n), bad.std() / math.sqrt(2 * n)
    assert abs(exact.mean()) < 4 * se_exact  # unbiased estimate of ||E[D(x')|x] - D(x)||^2 = 0
    assert bad.mean() > 6 * se_bad and bad.mean() > 5 * abs(exact.mean())


def test_cp_gradients_flow_into_both_denoiser_calls_but_not_the_chains():
    w = torch.tensor(1.0, requires_grad=True)
    calls = []

    def den(x, s, y=None):
        calls.append(torch.is_grad_enabled())
        return w * x

    x = torch.randn(4, 2)
    s = torch.full((4,), 0.5)
    per = cp_estimate(den, x, s, torch.full((4,), 0.05), torch.randn(3, 4, 2), torch.randn(3, 4, 2), chain_steps=3)
    per.sum().backward()
    assert w.grad is not None and calls[:6] == [False] * 6 and calls[6:] == [True, True]


# ----------------------------------------------------------------------------------------------- FP
def _exact_score(x, sigma, labels=None):
    return MIX.score(x, sigma)


def _perturbed_score(x, sigma, labels=None):
    return MIX.score(x, sigma) * (1 + 0.2 * torch.tanh(sigma[:, None]))


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0, 5.0])
def test_fp_residual_vanishes_for_the_exact_score(sigma):
    g = torch.Generator().manual_seed(1)
    _, x, s = _noisy(256, sigma, g)
    scale = sigma**2  # sigma^2 r is dimensionless
    r = scale * fpe_residual(_exact_score, x, s)  # float64: only the O(h^2) finite-difference error remains
    rp = scale * fpe_residual(_perturbed_score, x, s)
    r32 = scale * fpe_residual(_exact_score, x.float(), s.float())  # float32: also round-off / h
    assert r.norm(dim=1).mean() < 1e-4
    assert r32.norm(dim=1).mean() < 1e-3
    assert rp.norm(dim=1).mean() > 5e-3 and rp.norm(dim=1).mean() > 50 * r32.norm(dim=1).mean()


@pytest.mark.parametrize("sigma", [0.1, 0.5, 2.0])
def test_fp_scalar_has_zero_mean_for_the_exact_score(sigma):
    """Stein's identity: E_x[div s + ||s||^2] = 0 under the noisy marginal for the exact score; a score scaled by
    1.3 gives E = (1.3^2 - 1.3) E||s||^2 > 0."""
    g = torch.Generator().manual_seed(7)
    _, x, s = _noisy(20_000, sigma, g)
    _, q = fpe_terms(_exact_score, x, s, create_graph=False)
    _, q_bad = fpe_terms(lambda x, s, y=None: 1.3 * MIX.score(x, s), x, s, create_graph=False)
    q, q_bad = sigma**2 * q.detach(), sigma**2 * q_bad.detach()  # dimensionless
    se = q.std() / math.sqrt(len(q))
    assert abs(q.mean()) < 4 * se
    assert q_bad.mean() > 10 * q_bad.std() / math.sqrt(len(q))


def test_fp_scalar_term_is_added_when_beta_is_positive():
    from quickstep.train.losses.fp import FPConfig, FPLoss

    obj = FPLoss(FPConfig(scalar_weight=0.01, divergence="exact"))
    w = torch.tensor(1.0, requires_grad=True)

    class Model:
        sigma_data = 0.5

        def edm_score(self, x, sigma, labels=None):
            return w * MIX.score(x, sigma)

    x = MIX.sample(32, torch.Generator().manual_seed(8))
    batch = Batch(x=x, y=None)
    terms = obj(Model(), batch, _ctx(32, batch=batch))
    assert set(terms) == {"fp", "fp_scalar"} and bool(terms["fp_scalar"] > 0)
    terms["fp_scalar"].backward()
    assert w.grad is not None and torch.isfinite(w.grad)
    with pytest.raises(ValueError, match="scalar_weight"):
        FPLoss(FPConfig(scalar_weight=-1.0))


def test_hutchinson_divergence_is_unbiased():
    g = torch.Generator().manual_seed(2)
    _, x, s = _noisy(64, 0.4, g)
    x = x.requires_grad_(True)
    sc = MIX.score(x, s)
    exact = divergence(sc, x)
    probes = torch.where(torch.rand(200, 64, 2, generator=g) < 0.5, -1.0, 1.0).double()
    est = torch.stack([divergence(sc, x, probe=p) for p in probes])  # [200, 64]
    err = (est.mean(0) - exact).detach()
    assert err.abs().mean() < 4 * (est.std(0) / math.sqrt(200)).mean()  # within Monte-Carlo error
    single = (est[0] - exact).abs().mean()
    assert err.abs().mean() < single / 5  # and it averages out


# ----------------------------------------------------------------------------------------------- STF
def test_stf_target_is_the_posterior_mean_under_the_references():
    g = torch.Generator().manual_seed(3)
    refs = MIX.sample(700, g, dtype=torch.float64)
    x = torch.randn(33, 2, generator=g, dtype=torch.float64)
    sigma = torch.rand(33, generator=g, dtype=torch.float64) * 2 + 0.05
    logits = -((x[:, None, :] - refs[None]) ** 2).sum(-1) / (2 * sigma[:, None] ** 2)  # [B, R]
    brute = torch.softmax(logits, dim=1) @ refs
    got = stf_targets(x, sigma, refs, chunk=64)  # 11 chunks, the last one partial
    torch.testing.assert_close(got.double(), brute, atol=1e-5, rtol=1e-5)


def test_stf_target_tends_to_the_dsm_target_as_sigma_vanishes():
    g = torch.Generator().manual_seed(4)
    refs = MIX.sample(512, g)
    x0 = refs[:16]  # the batch is the head of the reference set
    errs = []
    for sigma in (1.0, 0.1, 0.01, 0.001):
        s = torch.full((16,), sigma)
        x = x0 + sigma * torch.randn(16, 2, generator=g)
        errs.append((stf_targets(x, s, refs) - x0).norm(dim=1).mean().item())
    assert errs[-1] < 1e-4 and errs[0] > 0.1 and errs == sorted(errs, reverse=True)


def test_stf_target_approaches_the_exact_posterior_mean_for_many_references():
    g = torch.Generator().manual_seed(5)
    refs = MIX.sample(60_000, g)
    _, x, s = _noisy(64, 0.5, g)
    got = stf_targets(x.float(), s.float(), refs, chunk=8192)
    assert (got.double() - MIX.denoise(x, s)).norm(dim=1).mean() < 0.02


def test_stf_restricts_references_to_the_same_class():
    refs = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    x = torch.tensor([[0.1, 0.0], [0.1, 0.0]])
    s = torch.full((2,), 100.0)  # huge sigma: unrestricted weights are ~uniform
    got = stf_targets(x, s, refs, labels=torch.tensor([0, 1]), ref_labels=torch.tensor([0, 1]))
    torch.testing.assert_close(got, refs)


def _image_like_stf_inputs(seed: int = 6):
    """Image-sized rows (D = 768, like 3x16x16) at an intermediate sigma: ||x||^2 ~ 10^3 while the logit gaps
    that matter are O(1), so the ||x||^2 - 2 x.r + ||r||^2 expansion cancels catastrophically in bfloat16."""
    g = torch.Generator().manual_seed(seed)
    refs = torch.randn(96, 768, generator=g).clamp(-1, 1)
    x0 = refs[:16]
    sigma = torch.full((16,), 0.8)
    return x0 + sigma[:, None] * torch.randn(16, 768, generator=g), sigma, refs


def test_stf_target_is_float32_under_bf16_autocast():
    """The trainer runs objectives under bf16 autocast (CUDA); the STF target must still be computed in float32."""
    x, sigma, refs = _image_like_stf_inputs()
    want = stf_targets(x, sigma, refs, chunk=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = stf_targets(x, sigma, refs, chunk=32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_stf_objective_target_velocity_is_float32_under_bf16_autocast():
    from quickstep.train.losses.diffusion import perturb
    from quickstep.train.losses.stf import STFConfig, STFLoss

    _, _, refs = _image_like_stf_inputs(seed=7)
    batch, ref_batch = Batch(refs[:16]), Batch(refs)

    class _Stub:  # target_velocity only reads the model's sigma_d and class count
        sigma_data, num_classes = 0.5, 0

    def target(autocast: bool):
        ctx = _ctx(16, refs=ref_batch, batch=batch)
        p = perturb(batch, ctx, -0.4, 0.5, 0.5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return STFLoss(STFConfig(ref_batch=96, chunk=32)).target_velocity(_Stub(), batch, ctx, p)

    torch.testing.assert_close(target(True), target(False), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- composition
def _ctx(b: int, step: int = 0, *, refs: Batch | None = None, batch: Batch):
    return StepContext(step=step, total_steps=10, generator=torch.Generator().manual_seed(0),
                       device=torch.device("cpu"), references=(lambda n: refs) if refs else None,
                       global_batch=batch)


@pytest.mark.parametrize("combo", [("diffusion",), ("stf",), ("diffusion", "cp"), ("diffusion", "fp"),
                                   ("stf", "cp"), ("stf", "fp"), ("diffusion", "cp", "fp"),
                                   ("stf", "cp", "fp")])
def test_every_combination_returns_finite_terms_and_gradients(combo):
    from quickstep.train.core import MLPConfig, ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(MLPConfig(dim=2, hidden=32, depth=2, emb_channels=16, num_classes=8),
                                    logvar_channels=16))
    for p in model.backbone.fc_out.parameters():  # leave the zero init: make F depend on x
        torch.nn.init.normal_(p, std=0.1)
    x, y = MIX.sample(16, torch.Generator().manual_seed(0), return_labels=True)
    batch = Batch(x, y)
    ctx = _ctx(16, batch=batch, refs=batch)
    terms = {}
    for name in combo:
        spec = OBJECTIVES[name]
        terms.update(build_objective(name, spec.config_cls())(model, batch, ctx))
    assert set(terms) == {"stf" if n == "stf" else n for n in combo}
    total = sum(terms.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_cp_every_k_skips_off_steps_and_scales_by_k_on_steps():
    from quickstep.train.losses.cp import CPConfig, CPLoss

    x = MIX.sample(8, torch.Generator().manual_seed(0))
    batch = Batch(x)
    assert CPLoss(CPConfig(every=2))(_Exact(), batch, _ctx(8, step=1, batch=batch)) == {}
    on = CPLoss(CPConfig(every=2))(_Exact(), batch, _ctx(8, step=2, batch=batch))
    every_step = CPLoss(CPConfig(every=1))(_Exact(), batch, _ctx(8, step=2, batch=batch))
    assert set(on) == {"cp"} and float(every_step["cp"]) != 0.0
    torch.testing.assert_close(on["cp"], 2 * every_step["cp"])  # the expected weight is kept


class _Exact:
    """The exact GMM denoiser with a TrigFlowModel-like surface (denoise, sigma_data, num_classes)."""

    sigma_data = 0.5
    num_classes = 0

    def denoise(self, x, sigma, labels=None):
        return MIX.denoise(x, sigma).to(x.dtype)


class _Shifted(_Exact):
    """A perturbed denoiser: the exact one plus 4 sigma, which breaks the consistency property."""

    def denoise(self, x, sigma, labels=None):
        return super().denoise(x, sigma) + 4.0 * sigma[:, None].to(x.dtype)


def test_cp_objective_on_exact_denoiser_is_small_and_large_on_a_perturbed_one():
    """With the CDM defaults (eps_max 0.05, 5 chain steps) on 4096 samples: exact |cp| ~ 1e-4 (Monte-Carlo noise,
    measured <= 2.6e-4 over seeds 0-5), the 4-sigma shift ~ 7.5e-3-8.3e-3 over the same seeds."""
    from quickstep.train.losses.cp import CPConfig, CPLoss

    x = MIX.sample(4096, torch.Generator().manual_seed(0))
    batch = Batch(x)
    loss = CPLoss(CPConfig(weight=1.0, scale_by_sigma_data2=False))
    exact = loss(_Exact(), batch, _ctx(4096, batch=batch))["cp"].item()
    bad = loss(_Shifted(), batch, _ctx(4096, batch=batch))["cp"].item()  # the same noise draws
    assert abs(exact) < 5e-4
    assert bad > 5e-3 and bad > 10 * abs(exact)
