"""onnxruntime backend: one InferenceSession per step count; CPU, CUDA or TensorRT execution providers."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import MANIFEST, Bundle
from ..device import Device
from ..settings import ServeSettings
from .base import Backend, BackendError, want_cuda

log = logging.getLogger("quickstep.serve")


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise BackendError("the onnxruntime backend needs onnxruntime: pip install 'quickstep[serve]' "
                           "(or onnxruntime-gpu from the 'gpu' extra)") from e
    return ort


class OnnxRuntimeBackend(Backend):
    """Runs generator_{k}step.onnx; providers chosen from availability and settings, checked after creation."""

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, settings: ServeSettings):
        super().__init__(bundle, settings)
        self.sessions: dict[int, Any] = {}
        self.providers: list[str] = []

    def _requested_providers(self, ort: Any, warn: bool = False) -> list[Any]:
        available = set(ort.get_available_providers())
        use_cuda = want_cuda(self.settings, "CUDAExecutionProvider" in available)
        providers: list[Any] = []
        if use_cuda:
            if self.settings.ort_tensorrt and "TensorrtExecutionProvider" in available:
                cache = str(self.trt_cache_dir())
                providers.append(("TensorrtExecutionProvider", {
                    "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                    "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}))
            elif self.settings.ort_tensorrt and warn:
                log.warning("--ort-tensorrt: onnxruntime has no TensorrtExecutionProvider here (available: %s); "
                            "using CUDA", sorted(available))
            providers.append(("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}))
        providers.append("CPUExecutionProvider")
        return providers

    def trt_cache_dir(self) -> Path:
        """Where the TensorRT provider caches engines for this bundle: outside the bundle (which may be read-only
        and must hold only the files its manifest lists), keyed by the manifest's sha256 so a re-exported bundle
        never picks up stale engines."""
        digest = hashlib.sha256((self.bundle.path / MANIFEST).read_bytes()).hexdigest()[:16]
        return self.settings.ort_trt_cache_root() / digest

    def _make_trt_cache(self, requested: list[Any]) -> None:
        for p in requested:
            if isinstance(p, tuple) and p[0] == "TensorrtExecutionProvider":
                path = Path(p[1]["trt_engine_cache_path"])
                try:
                    path.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise BackendError(f"cannot create the onnxruntime TensorRT engine cache {path}: {e.strerror}; "
                                       "set --ort-trt-cache-dir (QUICKSTEP_ORT_TRT_CACHE_DIR) to a writable "
                                       "directory") from e

    def preflight(self) -> None:
        ort = _import_ort()
        for steps in self.bundle.steps_supported:
            self.bundle.graph_file(steps, "onnx", "ONNX generator")
        want_cuda(self.settings, "CUDAExecutionProvider" in ort.get_available_providers())

    def load(self) -> None:
        ort = _import_ort()
        requested = self._requested_providers(ort, warn=True)
        self._make_trt_cache(requested)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.settings.intra_op_threads:
            opts.intra_op_num_threads = self.settings.intra_op_threads
        opts.log_severity_level = 3
        if not self.settings.intra_op_spinning:
            # idle intra-op threads sleep instead of spinning: the CPU they would burn serves HTTP instead
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for steps in self.bundle.steps_supported:
            path = self.bundle.graph_file(steps, "onnx", "ONNX generator")
            try:
                sess = ort.InferenceSession(str(path), sess_options=opts, providers=requested)
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise BackendError(f"onnxruntime could not load {path}: {e}") from e
            self.sessions[steps] = sess
            self.providers = list(sess.get_providers())  # what really runs, never the available list
        wanted_cuda = any((p[0] if isinstance(p, tuple) else p) == "CUDAExecutionProvider" for p in requested)
        if wanted_cuda and "CUDAExecutionProvider" not in self.providers:
            if self.settings.device == "cuda":
                raise BackendError(f"onnxruntime fell back to {self.providers} although device 'cuda' was requested; "
                                   "check the CUDA/cuDNN libraries onnxruntime-gpu needs")
            log.warning("onnxruntime fell back to %s (CUDA provider could not be initialised)", self.providers)
        self.device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"

    def device_info(self) -> Device:
        """The first execution provider of the loaded sessions (before load: the planned one)."""
        if self.providers:
            return Device.of_provider(self.name, self.providers[0])
        return self.planned_device()

    def planned_device(self) -> Device:
        """The first provider requested: the one that will run unless it fails to initialise."""
        if self.providers:
            return self.device_info()
        first = self._requested_providers(_import_ort())[0]
        return Device.of_provider(self.name, first[0] if isinstance(first, tuple) else first)

    def _feeds(self, steps: int, noises: list[np.ndarray], labels: np.ndarray | None) -> dict[str, np.ndarray]:
        g = self.bundle.graphs[steps]
        feeds = {name: np.ascontiguousarray(x, np.float32) for name, x in zip(g.noise_inputs, noises, strict=True)}
        if g.has_labels:
            if labels is None:
                raise BackendError(f"model {self.bundle.name!r} is class-conditional: class_labels are required")
            feeds["class_labels"] = np.ascontiguousarray(labels, np.int64)
        return feeds

    def run(self, steps: int, noises: list[np.ndarray], labels: np.ndarray | None) -> np.ndarray:
        sess = self.sessions[steps]
        feeds = self._feeds(steps, noises, labels)
        out_name = self.bundle.graphs[steps].outputs[0].name if self.bundle.graphs[steps].outputs else "images"
        if self.device == "cuda":
            # IOBinding: inputs copied once to the device, output bound to host memory (no hidden extra copies)
            binding = sess.io_binding()
            for name, arr in feeds.items():
                binding.bind_cpu_input(name, arr)
            binding.bind_output(out_name, "cpu")
            sess.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]
        return sess.run([out_name], feeds)[0]

    def close(self) -> None:
        self.sessions.clear()
