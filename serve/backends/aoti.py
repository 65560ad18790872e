"""AOTInductor backend: generator_{k}step.pt2 packages loaded with torch._inductor.aoti_load_package."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..bundle import Bundle
from ..settings import ServeSettings
from .base import Backend, BackendError, want_cuda


class AotiBackend(Backend):
    """Runs the ahead-of-time compiled generators (one package per step count, dynamic batch)."""

    name = "aoti"

    def __init__(self, bundle: Bundle, settings: ServeSettings):
        super().__init__(bundle, settings)
        self.runners: dict[int, Any] = {}
        self._torch: Any = None

    def preflight(self) -> None:
        for steps in self.bundle.steps_supported:
            self.bundle.graph_file(steps, "aoti", "AOTInductor package (.pt2)")

    def load(self) -> None:
        try:
            import torch
            from torch._inductor import aoti_load_package
        except ImportError as e:  # pragma: no cover
            raise BackendError("the aoti backend needs torch>=2.6: pip install 'quickstep[train]'") from e
        self._torch = torch
        self.device = "cuda" if want_cuda(self.settings, torch.cuda.is_available()) else "cpu"
        for steps in self.bundle.steps_supported:
            path = self.bundle.graph_file(steps, "aoti", "AOTInductor package (.pt2)")
            try:
                self.runners[steps] = aoti_load_package(str(path))
            except Exception as e:  # noqa: BLE001
                raise BackendError(f"could not load AOTInductor package {path}: {e} (packages are tied to the "
                                   "torch version and device they were compiled for)") from e

    def run(self, steps: int, noises: list[np.ndarray], labels: np.ndarray | None) -> np.ndarray:
        torch = self._torch
        args = [torch.from_numpy(np.ascontiguousarray(n, np.float32)).to(self.device) for n in noises]
        if self.bundle.graphs[steps].has_labels:
            if labels is None:
                raise BackendError(f"model {self.bundle.name!r} is class-conditional: class_labels are required")
            args.append(torch.from_numpy(np.ascontiguousarray(labels, np.int64)).to(self.device))
        with torch.inference_mode():
            out = self.runners[steps](*args)
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out.cpu().numpy()

    def close(self) -> None:
        self.runners.clear()
