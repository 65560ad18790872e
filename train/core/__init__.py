"""The one shared definition of Quickstep's math: TrigFlow, networks, model, samplers, checkpoints.

Imports torch, numpy, safetensors and the standard library only.
"""

from .model import TrigFlowModel, build_model
from .networks import MLPConfig, ModelConfig, UNetConfig
from .trigflow import SIGMA_DATA, T_MID, sigma_to_t, t_max, t_to_sigma

__all__ = [
    "SIGMA_DATA",
    "T_MID",
    "MLPConfig",
    "ModelConfig",
    "TrigFlowModel",
    "UNetConfig",
    "build_model",
    "sigma_to_t",
    "t_max",
    "t_to_sigma",
]
