"""Whole-sampler generator graphs: standard-normal noise in, uint8 NHWC images out.

What the ONNX/AOTInductor exports contain and what the server's torch backend runs: the sampler, the
sigma_d scaling of the noise, clamping and quantisation all sit inside one module, so every backend
computes the same function of the same inputs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from quickstep.artifacts import ArtifactError, BundleManifest

from .model import TrigFlowModel
from .sampling import sample_consistency
from .trigflow import consistency_times


def to_uint8_nhwc(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images [B, C, H, W] -> uint8 [B, H, W, C] (round half up after clamping)."""
    y = torch.clamp((x + 1.0) * 127.5 + 0.5, 0.0, 255.0)
    return torch.floor(y).to(torch.uint8).permute(0, 2, 3, 1)


INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def inference_copy(model: TrigFlowModel, *, channels_last: bool = False,
                   dtype: torch.dtype | str | None = None) -> TrigFlowModel:
    """A frozen eval copy of `model` laid out for fast inference: channels_last (NHWC) activations and/or weights
    cast to `dtype` (bfloat16: no autocast re-casting the weights every call; the sampler arithmetic around the
    network stays in the input's dtype, see TrigFlowModel.forward).  The original model is left untouched."""
    if isinstance(dtype, str):
        if dtype not in INFERENCE_DTYPES:
            raise ValueError(f"inference dtype must be one of {', '.join(INFERENCE_DTYPES)}, got {dtype!r}")
        dtype = INFERENCE_DTYPES[dtype]
    if dtype is not None and dtype not in INFERENCE_DTYPES.values():
        raise ValueError(f"inference dtype must be one of {', '.join(INFERENCE_DTYPES)}, got {dtype}")
    out = copy.deepcopy(model).eval().requires_grad_(False)
    if dtype is not None:
        out.backbone.to(dtype)
    if channels_last:
        out.set_channels_last(True)
    return out


class ConsistencyGenerator(nn.Module):
    """noise [B,C,H,W] (N(0,I)) [, noise2 ... for later steps] [, class_labels [B] int64] -> uint8 [B,H,W,C]."""

    def __init__(self, model: TrigFlowModel, steps: int, ts: list[float] | None = None):
        super().__init__()
        self.model = model
        self.steps = steps
        self.ts = list(ts) if ts is not None else consistency_times(steps, sigma_data=model.sigma_data)
        if len(self.ts) != steps:
            raise ValueError(f"{steps} steps need {steps} times, got {len(self.ts)}")

    def forward(self, noise: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        extra = [n * self.model.sigma_data for n in rest[: self.steps - 1]]
        labels = rest[self.steps - 1] if len(rest) >= self.steps else None
        x0 = sample_consistency(self.model, noise * self.model.sigma_data, ts=self.ts, class_labels=labels,
                                extra_noise=extra if extra else None)
        return to_uint8_nhwc(x0)


class DenoiserGraph(nn.Module):
    """(x_t [B,...], t [B] [, class_labels]) -> F_theta(x_t / sigma_d, t): the raw network for diffusion bundles."""

    def __init__(self, model: TrigFlowModel):
        super().__init__()
        self.model = model

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x_t, t, class_labels)


class HeunGenerator(nn.Module):
    """noise [B,C,H,W] (N(0,I)) [, class_labels] -> uint8 [B,H,W,C]: the teacher's EDM Heun sampler
    (Karras et al. 2022, Alg. 2) unrolled over `num_steps` Karras steps (2*num_steps-1 network evaluations)."""

    def __init__(self, model: TrigFlowModel, num_steps: int = 18):
        super().__init__()
        from .sampling import karras_sigmas

        self.model = model
        self.num_steps = num_steps
        self.sigmas = [float(s) for s in karras_sigmas(num_steps)]

    def forward(self, noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        from .sampling import sample_heun

        x = noise * self.sigmas[0]
        x0 = sample_heun(self.model.denoise, x, torch.tensor(self.sigmas), class_labels=class_labels)
        return to_uint8_nhwc(x0)


def generator_module(model: TrigFlowModel, kind: str, steps: int, ts: list[float] | None = None) -> nn.Module:
    """The whole-sampler module of a model of `kind` at `steps` (what export traces and the torch backend runs):
    a consistency model's sCM sampler at `ts` (default: its 1-/2-step times), a diffusion model's Heun sampler
    over `steps` Karras steps."""
    if kind == "consistency":
        return ConsistencyGenerator(model, steps, ts=ts)
    if kind == "diffusion":
        return HeunGenerator(model, num_steps=steps)
    raise ValueError(f"kind must be 'consistency' or 'diffusion', got {kind!r}")


def bundle_generators(bundle_dir: str | Path, manifest: BundleManifest, *, device: str = "cpu",
                      dtype: str = "float32", channels_last: bool = False) -> dict[int, nn.Module]:
    """{steps: whole-sampler module} for every step count a bundle supports, over its torch weights (the EMA
    weights of its config.json + model.safetensors) on `device`, at the consistency times the manifest records:
    what the server's torch backend runs (and may compile).  `dtype` / `channels_last` lay the network out with
    `inference_copy`.  The `torch` entry of the `quickstep.generators` entry-point group
    (`quickstep.artifacts.load_generators`), so the server reaches train.core without importing it; a checkpoint
    problem is raised as an ArtifactError."""
    from .checkpoint import CheckpointError, load_model

    try:
        model = load_model(bundle_dir, map_location=device)
    except CheckpointError as e:
        raise ArtifactError(str(e)) from e
    if dtype != "float32" or channels_last:
        model = inference_copy(model, channels_last=channels_last, dtype=dtype)
    return {s: generator_module(model, manifest.kind, s, ts=manifest.consistency_times(s)).eval()
            for s in manifest.steps_supported}
