"""TrigFlowModel: the preconditioning around a backbone (sCM paper, Sec. 3).

F_theta(x_t / sigma_d, t, y) is the raw network; everything else derives from it:
  consistency / denoiser  x0_hat = cos t * x_t - sin t * sigma_d * F
  velocity                dx_t/dt = sigma_d * F
  score                   -(x_t - cos t * x0_hat) / (sigma_d^2 sin^2 t)
  EDM view                D(x_sigma; sigma) = x0_hat at x_t = x_sigma cos t, t = arctan(sigma / sigma_d)
"""

from __future__ import annotations

import torch
from torch import nn

from .networks import ModelConfig, PositionalEmbedding, build_backbone
from .trigflow import bcast


class LogVarHead(nn.Module):
    """Adaptive weighting: positional embedding of t -> linear -> scalar log-variance (sCM, EDM2)."""

    def __init__(self, channels: int, time_scale: float):
        super().__init__()
        self.pos = PositionalEmbedding(channels, scale=time_scale)
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pos(t)).squeeze(1)  # [B]


class TrigFlowModel(nn.Module):
    """F_theta with TrigFlow preconditioning; `config` rebuilds it from JSON."""

    def __init__(self, backbone: nn.Module, config: ModelConfig):
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.sigma_data = float(config.sigma_data)
        self.logvar_head = (
            LogVarHead(config.logvar_channels, config.backbone.time_scale) if config.logvar_channels > 0 else None
        )

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.config.sample_shape

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def _t(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return t  # [B]

    # -- TrigFlow view ---------------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The raw network output F_theta(x_t / sigma_d, t, y).  x_t: [B, ...], t: [B] or scalar.

        A backbone cast to another float dtype (bfloat16 weights for inference) gets x in its dtype and t as given
        (the time embedding computes in >= float32); its output comes back in x_t's dtype."""
        x_in, t = x_t / self.sigma_data, self._t(t, x_t)
        wdtype = self.backbone_dtype
        if wdtype is None or wdtype == x_in.dtype:
            return self.backbone(x_in, t, class_labels)
        return self.backbone(x_in.to(wdtype), t, class_labels).to(x_t.dtype)

    @property
    def backbone_dtype(self) -> torch.dtype | None:
        """The dtype of the backbone's weights (float32 unless cast); None for a backbone without weights."""
        p = next(self.backbone.parameters(), None)
        return None if p is None else p.dtype

    def set_channels_last(self, enabled: bool = True) -> TrigFlowModel:
        """channels_last (NHWC) weights and activations for a UNet backbone (a no-op for the MLP)."""
        if hasattr(self.backbone, "set_channels_last"):
            self.backbone.set_channels_last(enabled)
        return self

    def consistency(self, x_t: torch.Tensor, t: torch.Tensor | float, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """f_theta(x_t, t) = cos t * x_t - sin t * sigma_d * F_theta(x_t / sigma_d, t)."""
        t = self._t(t, x_t)
        F_out = self(x_t, t, class_labels)
        return bcast(torch.cos(t), x_t) * x_t - bcast(torch.sin(t), x_t) * self.sigma_data * F_out

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor | float, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """PF-ODE velocity dx_t/dt = sigma_d * F_theta(x_t / sigma_d, t)."""
        return self.sigma_data * self(x_t, t, class_labels)

    def score(self, x_t: torch.Tensor, t: torch.Tensor | float, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """grad log p_t(x_t) = -(x_t - cos t * x0_hat) / (sigma_d^2 sin^2 t)."""
        t = self._t(t, x_t)
        x0 = self.consistency(x_t, t, class_labels)
        return -(x_t - bcast(torch.cos(t), x_t) * x0) / bcast(self.sigma_data**2 * torch.sin(t) ** 2, x_t)

    def logvar(self, t: torch.Tensor) -> torch.Tensor:
        """Learned log-variance u(t) for adaptive weighting ([B]); zeros when the head is disabled."""
        if self.logvar_head is None:
            return torch.zeros_like(t)
        return self.logvar_head(t)

    # -- EDM view --------------------------------------------------------------------------------
    def denoise(self, x_sigma: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """EDM denoiser D(x_sigma; sigma) = x0_hat, with x_t = x_sigma cos t and t = arctan(sigma / sigma_d)."""
        sigma = self._t(sigma, x_sigma)
        t = torch.atan(sigma / self.sigma_data)
        x_t = x_sigma * bcast(torch.cos(t), x_sigma)
        return self.consistency(x_t, t, class_labels)

    def edm_score(self, x_sigma: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """EDM score s = (D - x_sigma) / sigma^2."""
        sigma = self._t(sigma, x_sigma)
        return (self.denoise(x_sigma, sigma, class_labels) - x_sigma) / bcast(sigma**2, x_sigma)


def build_model(config: ModelConfig) -> TrigFlowModel:
    """Build a freshly initialised TrigFlowModel from its config."""
    return TrigFlowModel(build_backbone(config.backbone), config)
