"""torch backend: the bundle's weights rebuilt with train.core and run eagerly or under torch.compile."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..bundle import Bundle, BundleError
from ..settings import ServeSettings
from .base import Backend, BackendError, want_cuda


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover
        raise BackendError("the torch backend needs torch: pip install 'quickstep[train]' (torch==2.13.0)") from e
    return torch


class TorchBackend(Backend):
    """ConsistencyGenerator / HeunGenerator of train.core over load_model(bundle) - the reference computation."""

    name = "torch"

    def __init__(self, bundle: Bundle, settings: ServeSettings):
        super().__init__(bundle, settings)
        self.generators: dict[int, Any] = {}
        self._torch: Any = None

    def preflight(self) -> None:
        torch = _import_torch()
        files = self.bundle.torch_files
        if not files:
            raise BundleError(f"bundle {self.bundle.name!r} has no 'torch' section (model.safetensors + config.json)")
        for rel in files.values():
            self.bundle.file(rel)
        self.device = "cuda" if want_cuda(self.settings, torch.cuda.is_available()) else "cpu"

    def load(self) -> None:
        torch = self._torch = _import_torch()
        from quickstep.train.core.checkpoint import CheckpointError, load_model
        from quickstep.train.core.generator import ConsistencyGenerator, HeunGenerator

        files = self.bundle.torch_files
        if not files:
            raise BundleError(f"bundle {self.bundle.name!r} has no 'torch' section (model.safetensors + config.json)")
        for rel in files.values():
            self.bundle.file(rel)
        self.device = "cuda" if want_cuda(self.settings, torch.cuda.is_available()) else "cpu"
        try:
            model = load_model(self.bundle.path, map_location=self.device)
        except CheckpointError as e:
            raise BundleError(f"bundle {self.bundle.name!r}: torch weights cannot be loaded: {e}") from e
        for steps in self.bundle.steps_supported:
            if self.bundle.kind == "diffusion":
                gen = HeunGenerator(model, num_steps=steps)
            else:
                gen = ConsistencyGenerator(model, steps, ts=self.bundle.times.get(steps))
            gen = gen.eval()
            if self.settings.torch_compile:
                gen = torch.compile(gen, mode=self.settings.torch_compile_mode)
            self.generators[steps] = gen

    def run(self, steps: int, noises: list[np.ndarray], labels: np.ndarray | None) -> np.ndarray:
        torch = self._torch
        g = self.bundle.graphs[steps]
        args = [torch.from_numpy(np.ascontiguousarray(n, np.float32)).to(self.device) for n in noises]
        if g.has_labels:
            if labels is None:
                raise BackendError(f"model {self.bundle.name!r} is class-conditional: class_labels are required")
            args.append(torch.from_numpy(np.ascontiguousarray(labels, np.int64)).to(self.device))
        with torch.inference_mode():
            out = self.generators[steps](*args)  # [B, H, W, C] uint8
        return out.cpu().numpy()

    def close(self) -> None:
        self.generators.clear()
