"""Exact GMM diagnostics: ~0 for the exact model, clearly positive for a perturbed one."""

from __future__ import annotations

import pytest
import torch
from quickstep.train.data import gmm_preset
from quickstep.train.eval import gmm_diagnostics as gd

BANDS = (0.02, 0.2, 1.0, 10.0, 80.0)


@pytest.fixture(scope="module")
def mix():
    return gmm_preset("ring8")


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_score_error_and_fpe_residual(mix):
    exact, bad = gd.exact_model(mix), gd.exact_model(mix, perturb=0.1)
    se0 = gd.score_error(exact, mix, bands=BANDS, n=256, generator=_g())
    se1 = gd.score_error(bad, mix, bands=BANDS, n=256, generator=_g())
    assert max(b.mean for b in se0) < 1e-20
    assert all(b.mean > 1e-6 and b.mean > 5 * b.stderr for b in se1)
    fp0 = gd.fpe_residual(exact, mix, bands=BANDS, n=64, generator=_g())
    fp1 = gd.fpe_residual(bad, mix, bands=BANDS, n=64, generator=_g())
    assert max(b.mean for b in fp0) < 1e-8  # finite-difference error only (float64)
    assert min(b.mean for b in fp1) > 1e-5 and max(b.mean for b in fp1) > 1e-3


def test_cp_violation_zero_for_exact_positive_for_perturbed(mix):
    bands = (3.0, 10.0, 80.0)
    kw = dict(bands=bands, n=128, chains=8, chain_steps=8)
    cp0 = gd.cp_violation(gd.exact_model(mix), mix, generator=_g(1), **kw)
    cp1 = gd.cp_violation(gd.exact_model(mix, perturb=0.3), mix, generator=_g(1), **kw)
    for b in cp0:  # unbiased estimate of 0 (+ Euler-Maruyama error): within noise
        assert abs(b.mean) < 4 * b.stderr + 1e-5
    assert sum(b.mean / b.stderr for b in cp1) > 10  # clearly positive overall
    assert cp1[-1].mean > 5 * cp1[-1].stderr


def test_stf_target_has_lower_error_than_dsm_at_intermediate_sigma(mix):
    tv = gd.stf_target_variance(mix, ref_batch=512, batch=128, bands=(0.001, 0.003, 0.3, 1.0, 80.0), repeats=1,
                                generator=_g(2))
    assert tv[0].ratio == pytest.approx(1.0, abs=0.05)  # small sigma: the posterior is the own sample (= DSM)
    assert tv[2].ratio < 0.2 and tv[3].ratio < 0.2  # intermediate/large sigma: STF's variance reduction


def test_sample_quality_floor_and_a_bad_sampler(mix):
    g = _g(3)
    good = mix.sample(1000, g)
    bad = good * 0.7
    q0 = gd.sample_quality(good, mix, generator=_g(4))
    q1 = gd.sample_quality(bad, mix, generator=_g(4))
    assert abs(q0.log_likelihood - q0.true_log_likelihood) < 0.1
    assert q0.sliced_w2 < 2 * q0.true_sliced_w2 + 0.02
    assert q1.log_likelihood < q0.log_likelihood - 2
    assert q1.sliced_w2 > 5 * q0.sliced_w2 and q1.mmd > 10 * abs(q0.mmd)
    with pytest.raises(ValueError, match="samples must have shape"):
        gd.sample_quality(torch.zeros(10, 3), mix)
