"""Native TensorRT backend: deserialises the bundle's *.plan engines and runs them with execute_async_v3.

Plans are tied to the GPU model and the TensorRT version that built them.  `quickstep-export tensorrt` names each
`<graph>.<gpu>.trt<version>.plan` and records every build in manifest graphs[k]["tensorrt_plans"][<gpu>.trt<version>]
(graphs[k]["tensorrt"] is only the latest build, maybe for another GPU), so the backend loads the plan whose tag
matches this GPU and TensorRT version, and refuses with the list of available plans when none does.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from quickstep.artifacts import plan_tag

from ..bundle import Bundle, BundleError
from ..settings import ServeSettings
from .base import Backend, BackendError

PLAN_KEYS = ("tensorrt", "plan", "trt")
_LEGACY_TAG = re.compile(r"^[^.]+\.(?P<tag>[^/]+\.trt\d[^/]*)\.plan$")  # <graph>.<gpu>.trt<version>.plan

log = logging.getLogger("quickstep.serve")


def select_plan(bundle: Bundle, steps: int, tag: str) -> Path:
    """The plan file built for `tag` (this GPU and TensorRT version) for `steps`; BundleError listing the plans
    the bundle has when none matches."""
    plans = bundle.graphs[steps].tensorrt_plans
    rebuild = (f"plans are tied to the GPU model and the TensorRT version: build one on this machine with "
               f"`quickstep-export tensorrt {bundle.path}`, or use --backend onnxruntime")
    if plans:
        rel = bundle.graphs[steps].plan(tag)
        if rel is None:
            available = ", ".join(f"{t} ({f})" for t, f in sorted(plans.items()))
            raise BundleError(f"bundle {bundle.name!r} has no TensorRT engine for this GPU and TensorRT version "
                              f"({tag}) for steps={steps}; plans available: {available}; {rebuild}")
        return bundle.file(rel)
    g = bundle.graphs[steps]
    key = next((k for k in PLAN_KEYS if k in g.files), None)
    if key is None:
        raise BundleError(f"bundle {bundle.name!r} has no TensorRT engine (*.plan) for steps={steps}; build one "
                          "on this GPU with `quickstep-export tensorrt` or use --backend onnxruntime")
    rel = g.files[key]
    m = _LEGACY_TAG.match(Path(rel).name)
    if m is not None and m.group("tag") != tag:
        raise BundleError(f"bundle {bundle.name!r} has no TensorRT engine for this GPU and TensorRT version ({tag}) "
                          f"for steps={steps}; plans available: {m.group('tag')} ({rel}); {rebuild}")
    if m is None:
        log.warning("bundle %s: TensorRT plan %s records no GPU/TensorRT tag; loading it on %s", bundle.name, rel, tag)
    return bundle.graph_file(steps, key, "TensorRT engine")


def _import_tensorrt() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendError("the tensorrt backend needs TensorRT: pip install 'quickstep[gpu]' on a machine with an "
                           "NVIDIA GPU (or use --backend onnxruntime)") from e
    try:
        import torch
    except ImportError as e:  # pragma: no cover
        raise BackendError("the tensorrt backend uses torch for CUDA buffers: pip install torch==2.13.0") from e
    if not torch.cuda.is_available():
        raise BackendError("the tensorrt backend needs a CUDA GPU and none is available; use --backend onnxruntime")
    return trt, torch


_TORCH_DTYPES = {"float32": "float32", "int64": "int64", "uint8": "uint8", "int32": "int32", "float16": "float16"}


class TensorRTBackend(Backend):
    """One engine + execution context per step count; torch tensors as device buffers, one CUDA stream."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, settings: ServeSettings):
        super().__init__(bundle, settings)
        self.engines: dict[int, Any] = {}
        self.contexts: dict[int, Any] = {}
        self.max_batch: dict[int, int] = {}
        self._trt: Any = None
        self._torch: Any = None
        self.device = "cuda"
        self.tag: str | None = None
        self.plans: dict[int, Path] = {}

    def _plan(self, steps: int) -> Path:
        if self.tag is None:
            trt, torch = _import_tensorrt()
            self.tag = plan_tag(torch.cuda.get_device_name(0), trt.__version__)
        return select_plan(self.bundle, steps, self.tag)

    def preflight(self) -> None:
        _import_tensorrt()
        for steps in self.bundle.steps_supported:
            self._plan(steps)

    def load(self) -> None:
        trt, torch = self._trt, self._torch = _import_tensorrt()
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        if runtime is None:
            raise BackendError("TensorRT could not create a runtime (is the CUDA driver usable?)")
        for steps in self.bundle.steps_supported:
            path = self.plans[steps] = self._plan(steps)
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BackendError(f"TensorRT could not deserialise {path}; plans are tied to the GPU and the TensorRT "
                                   "version that built them - rebuild it here")
            self.engines[steps] = engine
            self.contexts[steps] = engine.create_execution_context()
            first = self.bundle.graphs[steps].noise_inputs[0]
            try:
                self.max_batch[steps] = int(engine.get_tensor_profile_shape(first, 0)[2][0])
            except Exception:  # noqa: BLE001 - static engines have no profile
                self.max_batch[steps] = int(engine.get_tensor_shape(first)[0])

    def _run_chunk(self, steps: int, feeds: dict[str, np.ndarray]) -> np.ndarray:
        torch, trt = self._torch, self._trt
        engine, ctx = self.engines[steps], self.contexts[steps]
        stream = torch.cuda.current_stream()
        keep = []
        out_name, out = None, None
        b = next(iter(feeds.values())).shape[0]
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                t = torch.from_numpy(feeds[name]).cuda(non_blocking=False)
                ctx.set_input_shape(name, tuple(t.shape))
                ctx.set_tensor_address(name, t.data_ptr())
                keep.append(t)
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                shape = tuple(ctx.get_tensor_shape(name))
                shape = (b,) + shape[1:]
                out_name = name
                out = torch.empty(shape, dtype=getattr(torch, _TORCH_DTYPES.get(
                    str(np.dtype(trt.nptype(engine.get_tensor_dtype(name)))), "uint8")), device="cuda")
                ctx.set_tensor_address(name, out.data_ptr())
        if out is None or out_name is None:
            raise BackendError("TensorRT engine has no output tensor")
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise BackendError("TensorRT execute_async_v3 failed")
        stream.synchronize()
        return out.cpu().numpy()

    def run(self, steps: int, noises: list[np.ndarray], labels: np.ndarray | None) -> np.ndarray:
        g = self.bundle.graphs[steps]
        feeds = {n: np.ascontiguousarray(x, np.float32) for n, x in zip(g.noise_inputs, noises, strict=True)}
        if g.has_labels:
            if labels is None:
                raise BackendError(f"model {self.bundle.name!r} is class-conditional: class_labels are required")
            feeds["class_labels"] = np.ascontiguousarray(labels, np.int64)
        b = noises[0].shape[0]
        cap = max(1, self.max_batch.get(steps, b))
        parts = [self._run_chunk(steps, {k: v[i:i + cap] for k, v in feeds.items()}) for i in range(0, b, cap)]
        return np.concatenate(parts, axis=0)

    def close(self) -> None:
        self.contexts.clear()
        self.engines.clear()
