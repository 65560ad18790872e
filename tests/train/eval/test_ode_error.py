"""ODE error against an analytic PF-ODE map (Gaussian data: x0 = x_sigma_max * s / sqrt(s^2 + sigma_max^2))."""

from __future__ import annotations

import math

import pytest
import torch
from quickstep.train.core.model import TrigFlowModel
from quickstep.train.core.networks import MLPConfig, ModelConfig
from quickstep.train.data import GaussianMixture
from quickstep.train.eval.gmm_diagnostics import exact_model
from quickstep.train.eval.ode_error import ode_error
from quickstep.train.losses.direct_cm import ode_error as direct_cm_ode_error

S, SIGMA_D = 0.4, 0.5


class GaussianFlowMap(torch.nn.Module):
    """F such that the consistency function is the exact PF-ODE map of N(0, S^2 I), times `scale`."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x_in, t, class_labels=None):
        x_t, tb = x_in * SIGMA_D, t[:, None]
        sigma = SIGMA_D * torch.tan(tb)
        f = self.scale * (x_t / torch.cos(tb)) * S / torch.sqrt(S**2 + sigma**2)  # ODE map to sigma = 0
        return (torch.cos(tb) * x_t - f) / (torch.sin(tb) * SIGMA_D)


def _student(scale: float) -> TrigFlowModel:
    cfg = ModelConfig(backbone=MLPConfig(dim=2), sigma_data=SIGMA_D, logvar_channels=0)
    return TrigFlowModel(GaussianFlowMap(scale), cfg).eval()


def test_ode_error_zero_for_the_flow_map_and_analytic_for_a_scaled_one():
    teacher = exact_model(GaussianMixture([[0.0, 0.0]], stds=S), sigma_data=SIGMA_D)
    eps = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    coarse = ode_error(_student(1.0), teacher, eps, heun_steps=18)
    assert coarse.teacher_nfe == 35 and coarse.student_nfe == 1
    exact = ode_error(_student(1.0), teacher, eps, heun_steps=100)  # Heun converges to the flow map
    assert exact.mse < 2e-6 < 1e-4 < coarse.mse
    off = ode_error(_student(1.1), teacher, eps, heun_steps=100)
    # student - teacher = 0.1 x0 with x0 ~ N(0, S^2 I) (up to Heun's error): mse = 0.01 S^2
    assert off.mse == pytest.approx(0.01 * S**2, rel=0.1)
    assert off.rmse == pytest.approx(math.sqrt(off.mse))
    assert off.mse == pytest.approx(direct_cm_ode_error(_student(1.1), teacher, eps, heun_steps=100), rel=1e-5)
    with pytest.raises(ValueError, match="heun_steps"):
        ode_error(_student(1.0), teacher, eps, heun_steps=0)
