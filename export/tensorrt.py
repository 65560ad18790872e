"""TensorRT engines from a bundle's ONNX graphs (TensorRT 10/11 Python API), checked against onnxruntime.

Build sequence: Logger -> Builder -> create_network(STRONGLY_TYPED) -> OnnxParser -> builder config (workspace,
optimisation level, timing cache) -> one optimisation profile per batch bucket -> build_serialized_network ->
plan bytes.  Strongly typed networks take their precision from the graph (TRT 11 removed BuilderFlag.FP16), so
an fp16 bundle (exported with --fp16) gives fp16 engines and an fp32 bundle fp32 engines (TF32 off).

Plans are tied to the GPU model and the TensorRT version, so each is named
`<graph>.<gpu>.trt<version>.plan`; manifest.json names the latest build in graphs[key]["tensorrt"] and every
build in graphs[key]["tensorrt_plans"][<gpu>.trt<version>].  Profile 0 of each plan covers batch 1..max bucket
(a plain execution context works for every batch); profiles 1..n are the per-bucket ones.
The timing cache lives outside the bundle (default ~/.cache/quickstep/tensorrt/<gpu>.trt<version>.timing),
since caches must not travel across GPU models.

Needs the `gpu` extra (tensorrt) and a CUDA GPU; `quickstep-export tensorrt` exits 2 with a message otherwise.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quickstep.artifacts import ParityEntry, TensorRTBuild, plan_tag

from .bundle import bundle_graph_specs, bundle_model, read_manifest, refresh_files
from .onnx import (
    GENERATOR_TOLERANCE,
    ExportError,
    ExportGraph,
    ParityError,
    example_inputs,
    max_error,
    ort_session,
    parity_units,
)

DEFAULT_BUCKETS: tuple[int, ...] = (1, 8, 32)
WORKSPACE_BYTES = 2 << 30


class TensorRTUnavailable(ExportError):
    """tensorrt cannot be imported, or there is no CUDA GPU to build for."""


def import_tensorrt():
    """The tensorrt module and torch with CUDA, or TensorRTUnavailable naming what is missing."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a broken install raising OSError on its libraries
        raise TensorRTUnavailable(
            f"TensorRT is not available ({type(e).__name__}: {e}); install the gpu extra on a machine with an "
            "NVIDIA GPU: pip install 'quickstep[gpu]' (TensorRT wheels come from NVIDIA's package index)") from e
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT engines are built on the GPU that will run them, and no CUDA GPU is "
                                  "visible here (torch.cuda.is_available() is False)")
    return trt


def engine_tag(trt) -> str:
    """This GPU's plan tag (`quickstep.artifacts.plan_tag`), e.g. 'NVIDIA_H200.trt10.13.3'."""
    import torch

    return plan_tag(torch.cuda.get_device_name(0), trt.__version__)


def check_buckets(batches: Sequence[int]) -> tuple[int, ...]:
    """Sorted unique positive batch buckets."""
    b = tuple(sorted({int(x) for x in batches}))
    if not b or b[0] < 1:
        raise ExportError(f"batch buckets must be positive integers, got {list(batches)}")
    return b


def _profiles(spec: ExportGraph, buckets: Sequence[int]) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    """Profile 0 covers every batch in [1, largest bucket] (what a plain execution context uses); profile i >= 1
    covers (bucket i-1, bucket i] and is optimised for bucket i."""
    ranges = [(1, buckets[-1], buckets[-1])]
    lo = 1
    for b in buckets:
        ranges.append((lo, b, b))
        lo = b + 1
    out = []
    for mn, opt, mx in ranges:
        shapes = {}
        for s in spec.inputs:
            dims = [int(d) for d in s.shape[1:]]
            shapes[s.name] = ((mn, *dims), (opt, *dims), (mx, *dims))
        out.append(shapes)
    return out


def build_engine(trt, onnx_path: Path, spec: ExportGraph, buckets: Sequence[int], timing_cache: Path,
                 *, opt_level: int = 3, workspace: int = WORKSPACE_BYTES) -> bytes:
    """Serialized TensorRT plan for one ONNX graph (strongly typed, one profile per batch bucket)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    config.builder_optimization_level = opt_level
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 graphs stay fp32; fp16 comes from the graph's own types
    cache_bytes = timing_cache.read_bytes() if timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    for shapes in _profiles(spec, buckets):
        profile = builder.create_optimization_profile()
        for name, (mn, opt, mx) in shapes.items():
            profile.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT failed to build an engine for {onnx_path.name} (see the log above)")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = timing_cache.with_suffix(".tmp")
    tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    os.replace(tmp, timing_cache)
    return bytes(memoryview(plan))


class TensorRTRunner:
    """Run a plan with torch CUDA buffers: pick the profile of the smallest bucket >= batch (profiles 1..n), set
    shapes and addresses, execute_async_v3 on a side stream."""

    def __init__(self, trt, plan: bytes, buckets: Sequence[int]):
        import torch

        self.torch = torch
        self.trt = trt
        self.buckets = tuple(buckets)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ExportError("TensorRT could not deserialize the plan (built for another GPU or TensorRT version?)")
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.stream = torch.cuda.Stream()
        self.contexts = []
        for i in range(len(self.buckets)):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(i + 1, self.stream.cuda_stream)
            self.contexts.append(ctx)
        self.stream.synchronize()

    def _torch_dtype(self, name: str):
        return self.torch.from_numpy(np.zeros(1, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        torch = self.torch
        batch = next(iter(feeds.values())).shape[0]
        idx = next((i for i, b in enumerate(self.buckets) if batch <= b), None)
        if idx is None:
            raise ExportError(f"batch {batch} exceeds the largest TensorRT bucket {self.buckets[-1]}")
        ctx = self.contexts[idx]
        keep = []
        for name in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda", self._torch_dtype(name))
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outs = {}
        for name in self.outputs:
            out = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=self._torch_dtype(name), device="cuda")
            ctx.set_tensor_address(name, out.data_ptr())
            outs[name] = out
        with torch.cuda.stream(self.stream):
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise ExportError("TensorRT execution failed")
        self.stream.synchronize()
        return outs[self.outputs[0]].cpu().numpy()


def tensorrt_parity(spec: ExportGraph, onnx_path: Path, runner: TensorRTRunner, batches: Sequence[int], *,
                    num_classes: int, tol: float) -> ParityEntry:
    """TensorRT vs onnxruntime (CPU) on the same random inputs at each batch size."""
    sess = ort_session(onnx_path)
    errs = {}
    for b in batches:
        feeds = example_inputs(spec, int(b), num_classes)
        errs[int(b)] = max_error(spec, runner(feeds), sess.run(None, feeds)[0])
    return ParityEntry(units=parity_units(spec), reference="onnxruntime", max_abs_err=errs, tolerance=tol,
                       passed=bool(max(errs.values(), default=0.0) <= tol))


def export_tensorrt_bundle(bundle: str | Path, *, batches: Sequence[int] = DEFAULT_BUCKETS,
                           timing_cache: str | Path | None = None, opt_level: int = 3) -> dict[str, Any]:
    """Build a plan per generator graph for this GPU, check it against onnxruntime, add it to the bundle."""
    trt = import_tensorrt()
    bundle = Path(bundle)
    buckets = check_buckets(batches)
    manifest = read_manifest(bundle)
    model = bundle_model(bundle)
    tag = engine_tag(trt)
    cache = Path(timing_cache) if timing_cache else Path.home() / ".cache" / "quickstep" / "tensorrt" / f"{tag}.timing"
    precision = manifest.precision
    tol = float(GENERATOR_TOLERANCE[precision] + 1)  # TensorRT picks its own kernels: allow one more level
    parity_batches = sorted({1, buckets[-1], max(1, buckets[-1] - 1)})
    results: dict[str, Any] = {}
    for spec in bundle_graph_specs(bundle, manifest, model):
        graph = manifest.graphs[spec.key]
        if not graph.onnx:
            raise ExportError(f"the bundle's graph for steps={spec.key} has no ONNX file to build from")
        onnx_path = bundle / graph.onnx
        t0 = time.perf_counter()
        plan = build_engine(trt, onnx_path, spec, buckets, cache, opt_level=opt_level)
        build_s = time.perf_counter() - t0
        entry = tensorrt_parity(spec, onnx_path, TensorRTRunner(trt, plan, buckets), parity_batches,
                                num_classes=model.num_classes, tol=tol)
        entry = entry.with_extra(build_s=round(build_s, 3))
        if not entry.passed:
            raise ParityError(f"TensorRT parity failed for {onnx_path.name}: {entry.summary()}; plan not added")
        filename = f"{Path(spec.filename).stem}.{tag}.plan"
        tmp = bundle / f".{filename}.tmp"
        tmp.write_bytes(plan)
        os.replace(tmp, bundle / filename)
        graph.tensorrt = filename  # the latest build; every GPU/TensorRT build stays in tensorrt_plans
        graph.tensorrt_plans[tag] = filename
        manifest.parity.record("tensorrt", spec.key, entry, tag=tag)
        results[spec.key] = {"file": filename, "bytes": len(plan), **entry.to_json()}
    manifest.tensorrt = {**(manifest.tensorrt or {}), tag: TensorRTBuild(
        trt_version=trt.__version__, batch_buckets=list(buckets), strongly_typed=True, precision=precision)}
    refresh_files(bundle, manifest)
    return results
