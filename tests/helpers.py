"""Shared test helpers.

Import them as `from tests.helpers import free_port, tiny_unet_config, tiny_checkpoint`
(tests/ is a package and the repo root is on sys.path under pytest; `from helpers import ...` also works
because tests/conftest.py appends tests/ to sys.path).
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch
from quickstep.train.core import ModelConfig, TrigFlowModel, UNetConfig, build_model
from quickstep.train.core.checkpoint import save_checkpoint

TINY_RESOLUTION = 8


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to 0, read it back, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_unet_config(num_classes: int = 0) -> ModelConfig:
    """A very small UNet for 1x8x8 images: 8 channels, mult (1, 2), attention at 4x4 (~46k params with 10 classes)."""
    return ModelConfig(
        backbone=UNetConfig(
            img_channels=1,
            img_resolution=TINY_RESOLUTION,
            model_channels=8,
            channel_mult=(1, 2),
            num_blocks=1,
            attn_resolutions=(4,),
            num_heads=1,
            num_classes=num_classes,
        ),
        sigma_data=0.5,
        logvar_channels=8,
    )


def perturb_zero_init(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Fill every all-zero parameter (the zero-initialised output layers) with small N(0, std^2) values,
    so the network's output depends on its inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def tiny_model(num_classes: int = 0, seed: int = 0) -> TrigFlowModel:
    """tiny_unet_config's model with seeded random, non-trivial weights, in eval mode."""
    with torch.random.fork_rng(devices=[]):  # nn layers initialise from the global RNG; keep it untouched
        torch.manual_seed(seed)
        model = build_model(tiny_unet_config(num_classes))
    return perturb_zero_init(model, seed=seed).eval()


def tiny_checkpoint(tmp_path: str | Path, kind: str = "consistency", num_classes: int = 0, seed: int = 0) -> Path:
    """Build a tiny model with random non-zero weights, save it with save_checkpoint, return the directory.

    The EMA weights differ slightly from the raw ones (so tests can tell them apart);
    config.json carries `kind` ('consistency' | 'diffusion'), `name` and a `data` section.
    """
    if kind not in ("consistency", "diffusion"):
        raise ValueError(f"kind must be 'consistency' or 'diffusion', got {kind!r}")
    model = tiny_model(num_classes, seed)
    ema = tiny_model(num_classes, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    path = Path(tmp_path) / f"tiny-{kind}{'-cond' if num_classes else ''}"
    extra = {
        "kind": kind,
        "name": path.name,
        "data": {"name": "tiny", "kind": "image", "shape": [1, TINY_RESOLUTION, TINY_RESOLUTION],
                 "num_classes": num_classes},
    }
    return save_checkpoint(path, model, ema=ema, extra_config=extra, state={"step": 0})
