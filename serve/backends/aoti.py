"""AOTInductor backend: generator_{k}step.pt2 packages loaded with torch._inductor.aoti_load_package.

A package runs on the device it was compiled for (manifest["aoti"]["device"], written by `quickstep-export aoti`),
so that device is used whatever --device auto would pick; a conflicting --device or a host without that device is
a clear error."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..bundle import Bundle
from ..settings import ServeSettings
from .base import Backend, BackendError, want_cuda
from .buckets import bucket_sizes
from .torch import TorchRunner, use_buckets


def package_device(bundle: Bundle, settings: ServeSettings, cuda_available: bool) -> str:
    """'cpu' or 'cuda': the device the bundle's packages were compiled for (manifest aoti.device); bundles that do
    not record it fall back to --device (auto = CUDA when available).  BackendError when the host lacks the
    recorded device or --device asks for the other one."""
    section = bundle.manifest.aoti
    recorded = section.device if section is not None else None
    if recorded is None:
        return "cuda" if want_cuda(settings, cuda_available) else "cpu"
    recorded = str(recorded).split(":")[0].lower()
    if recorded not in ("cpu", "cuda"):
        raise BackendError(f"bundle {bundle.name!r}: manifest aoti.device is {recorded!r}; expected 'cpu' or 'cuda'")
    if settings.device != "auto" and settings.device != recorded:
        raise BackendError(
            f"bundle {bundle.name!r}: its AOTInductor packages were compiled for {recorded!r} and cannot run on "
            f"--device {settings.device}; serve it with --device {recorded} (or auto), or re-export them with "
            f"`quickstep-export aoti --device {settings.device}`")
    if recorded == "cuda" and not cuda_available:
        raise BackendError(
            f"bundle {bundle.name!r}: its AOTInductor packages were compiled for CUDA and this host has no usable "
            "CUDA GPU (torch.cuda.is_available() is False); re-export them with `quickstep-export aoti --device cpu` "
            "or use --backend onnxruntime")
    return recorded


class AotiBackend(Backend):
    """Runs the ahead-of-time compiled generators (one package per step count, dynamic batch)."""

    name = "aoti"

    def __init__(self, bundle: Bundle, settings: ServeSettings):
        super().__init__(bundle, settings)
        self.runners: dict[int, Any] = {}
        self.runner: TorchRunner | None = None
        self._torch: Any = None

    def preflight(self) -> None:
        for steps in self.bundle.steps_supported:
            self.bundle.graph_file(steps, "aoti", "AOTInductor package (.pt2)")
        try:
            import torch
        except ImportError as e:  # pragma: no cover
            raise BackendError("the aoti backend needs torch>=2.6: pip install 'quickstep[train]'") from e
        self.device = package_device(self.bundle, self.settings, torch.cuda.is_available())

    def load(self) -> None:
        try:
            import torch
            from torch._inductor import aoti_load_package
        except ImportError as e:  # pragma: no cover
            raise BackendError("the aoti backend needs torch>=2.6: pip install 'quickstep[train]'") from e
        self._torch = torch
        self.device = package_device(self.bundle, self.settings, torch.cuda.is_available())
        for steps in self.bundle.steps_supported:
            path = self.bundle.graph_file(steps, "aoti", "AOTInductor package (.pt2)")
            try:
                self.runners[steps] = aoti_load_package(str(path))
            except Exception as e:  # noqa: BLE001
                raise BackendError(f"could not load AOTInductor package {path}: {e} (packages are tied to the "
                                   "torch version and device they were compiled for)") from e
        # one package serves every batch in [1, max_batch] (a dynamic batch dim); --batch-buckets on pads to
        # 1, 2, 4, ... like the torch backend; on CUDA the copies go through pinned host buffers
        section = self.bundle.manifest.aoti
        pkg_max = int(section.max_batch or 0) if section is not None else 0
        cap = min(self.settings.max_batch, pkg_max) if pkg_max else self.settings.max_batch
        buckets = bucket_sizes(cap) if use_buckets(self.settings, compiled=False) else None
        self.runner = TorchRunner(torch, self.bundle, self.device, self.runners, buckets, cap)

    def run(self, steps: int, noises: list[np.ndarray], labels: np.ndarray | None) -> np.ndarray:
        if self.runner is None:
            raise BackendError("the aoti backend is not loaded")
        return self.runner.run(steps, noises, labels)

    def warmup(self) -> None:
        if self.runner is not None and self.runner.buckets is not None:
            self.runner.warmup(repeats=1)
        super().warmup()

    def close(self) -> None:
        self.runners.clear()
        self.runner = None
