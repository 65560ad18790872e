"""The backend interface: one bundle, one device; `run(steps, noises, labels) -> uint8 NHWC images`."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import numpy as np

from ..bundle import Bundle
from ..device import Device
from ..settings import ServeSettings


class BackendError(RuntimeError):
    """A backend could not be created or failed to run (the message names the cause and the fix)."""


class Backend(ABC):
    """Runs a bundle's whole-sampler graphs: standard-normal noise in, uint8 [B, H, W, C] images out."""

    name: str = "base"

    def __init__(self, bundle: Bundle, settings: ServeSettings):
        self.bundle = bundle
        self.settings = settings
        self.device = "cpu"

    def preflight(self) -> None:
        """Cheap checks at start-up (imports, files, device) so a misconfigured server fails before it listens."""
        return None

    @abstractmethod
    def load(self) -> None:
        """Create sessions / engines / modules for every supported step count (may be slow)."""

    @abstractmethod
    def run(self, steps: int, noises: list[np.ndarray], labels: np.ndarray | None) -> np.ndarray:
        """noises: [B, C, H, W] float32 each (noise, noise2, ...); labels: [B] int64 or None -> [B, H, W, C] uint8."""

    def device_info(self) -> Device:
        """Where this backend runs now (after load(): what really runs)."""
        return Device(self.name, "cuda" if self.device == "cuda" else "cpu")

    def planned_device(self) -> Device:
        """What device_info() will be once loaded, known after preflight() (the quality gate keys on it)."""
        return self.device_info()

    def describe(self) -> str:
        """Display form of device_info(): backend name with the execution provider/device in use."""
        return str(self.device_info())

    def warmup(self) -> None:
        """Run every step count at batch 1 and max_batch so first requests do not pay allocation costs."""
        c, h, w = self.bundle.image_shape
        for steps in self.bundle.steps_supported:
            g = self.bundle.graphs[steps]
            for b in sorted({1, self.settings.max_batch}):
                noises = [np.zeros((b, c, h, w), np.float32) for _ in g.noise_inputs]
                labels = np.zeros((b,), np.int64) if g.has_labels else None
                self.run(steps, noises, labels)
        if self.settings.warmup_delay_s:
            time.sleep(self.settings.warmup_delay_s)

    def close(self) -> None:
        """Release sessions/engines (nothing to release by default)."""
        return None


def want_cuda(settings: ServeSettings, cuda_available: bool) -> bool:
    """device=cuda requires CUDA; auto uses it when present."""
    if settings.device == "cuda" and not cuda_available:
        raise BackendError("device 'cuda' was requested but CUDA is not available to this backend; "
                           "use --device cpu (or auto)")
    return settings.device == "cuda" or (settings.device == "auto" and cuda_available)


def create_backend(bundle: Bundle, settings: ServeSettings) -> Backend:
    """The backend named by settings.backend for `bundle` (heavy imports happen inside load())."""
    name = settings.backend
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundle, settings)
    if name == "torch":
        from .torch import TorchBackend

        return TorchBackend(bundle, settings)
    if name == "aoti":
        from .aoti import AotiBackend

        return AotiBackend(bundle, settings)
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(bundle, settings)
    raise BackendError(f"unknown backend {name!r}; choose onnxruntime, tensorrt, torch or aoti")


def open_runner(bundle_dir, backend: str, *, device: str = "cpu", max_batch: int = 64) -> Backend:
    """A verified bundle loaded on `backend` (preflight + load), as `quickstep-serve --backend` would run it: the
    `quickstep.runners` entry point through which `quickstep.artifacts.open_runner` reaches the serve backends."""
    from ..bundle import load_bundle

    settings = ServeSettings(backend=backend, device=device, ui=False, bundle=[], max_batch=max_batch)
    runner = create_backend(load_bundle(bundle_dir, verify=True), settings)
    runner.preflight()
    runner.load()
    return runner
