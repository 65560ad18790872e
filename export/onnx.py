"""ONNX export of the whole-sampler generator graphs (and the raw denoiser), with an onnxruntime parity gate.

Exporter: the legacy TorchScript exporter, `torch.onnx.export(..., dynamo=False)`.  In torch 2.13 the default
dynamo exporter needs onnxscript, writes a separate `.onnx.data` file unless told otherwise and silently fixes
the batch axis unless given `dynamic_shapes`; the TorchScript path exports these graphs in < 1 s with
`dynamic_axes` and has given bit-identical uint8 images on every model tried here (see
shared/reference/environment.md).  We pass `dynamo=False` only where the signature has the parameter.

fp16 (`--fp16`): there is no onnxconverter-common here, and tracing under CPU autocast proved unreliable (the
tracer kept most convolutions fp32 while CPU autocast put GroupNorm/softmax in fp16), so the fp16 variant is
explicit mixed precision: a copy of the module whose Conv2d and Linear layers hold fp16 weights and compute in
fp16 between fp32 activations (`half_compute`).  Normalisation (GroupNorm -> InstanceNormalization), softmax,
the sin/cos time embedding, the label embedding, the sampler arithmetic, clamping/quantisation and all graph
I/O (fp32 noise in, uint8 images out) stay fp32.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from quickstep.train.core.generator import DenoiserGraph, generator_module
from quickstep.train.core.model import TrigFlowModel
from quickstep.train.core.networks import UNetConfig
from torch import nn

from quickstep.artifacts import GraphEntry, ParityEntry, TensorSpec

SUPPORTED_OPSETS: tuple[int, ...] = (17, 18, 19, 20, 21)
CONSISTENCY_STEPS: tuple[int, ...] = (1, 2)
EXPORTER = "torch.onnx.export (TorchScript, dynamo=False)"
EXAMPLE_BATCH = 2  # trace batch; the batch axis is dynamic, parity runs at other sizes
# uint8 generator graphs: max |diff| in grey levels; float denoiser: max |diff| / max(1, max |reference|)
GENERATOR_TOLERANCE = {"fp32": 1, "fp16": 8}
DENOISER_TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2}


class ExportError(ValueError):
    """Bad export request (unknown opset, unsupported model or step count, unusable checkpoint)."""


class ParityError(ExportError):
    """An exported graph disagrees with the torch module beyond the tolerance."""


class MissingDependencyError(ExportError):
    """An optional dependency (onnx, onnxruntime, tensorrt) is not installed."""


def _t(name: str, dtype: str, shape: tuple[int | str, ...]) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=shape)


@dataclass(frozen=True)
class ExportGraph:
    """A torch module to export and its named I/O. `key` is the manifest key ('1', '2', '18' or 'denoiser')."""

    key: str
    filename: str
    module: nn.Module = field(compare=False, repr=False)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    kind: str  # 'generator' (uint8 images) | 'denoiser' (float F)

    def entry(self, **files: str) -> GraphEntry:
        """The manifest entry of this graph: its files per backend and its I/O."""
        return GraphEntry(inputs=list(self.inputs), outputs=list(self.outputs), **files)


# ----------------------------------------------------------------------------------------------- checks
def check_opset(opset: int) -> int:
    """The opset if this exporter supports it, else an ExportError listing the supported ones."""
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"unsupported ONNX opset {opset}; supported opsets are {list(SUPPORTED_OPSETS)}")
    return int(opset)


def require_image_model(model: TrigFlowModel) -> UNetConfig:
    """The UNet config of an image model; vector (MLP) models cannot be exported as image generators."""
    backbone = model.config.backbone
    if not isinstance(backbone, UNetConfig):
        raise ExportError(f"only image (UNet) models can be exported to a bundle; this checkpoint's backbone is "
                          f"{backbone.kind!r} (a vector model, e.g. the gmm toy)")
    return backbone


def check_consistency_steps(steps: Sequence[int]) -> tuple[int, ...]:
    """Sorted unique step counts, each in CONSISTENCY_STEPS."""
    steps = tuple(sorted({int(s) for s in steps}))
    bad = [s for s in steps if s not in CONSISTENCY_STEPS]
    if not steps or bad:
        raise ExportError(f"consistency bundles support steps {list(CONSISTENCY_STEPS)}; got {list(steps) or 'none'}"
                          + (f" ({bad} not supported)" if bad else ""))
    return steps


def check_heun_steps(steps: Sequence[int]) -> tuple[int, ...]:
    """Sorted unique Heun step counts in [1, 200]."""
    steps = tuple(sorted({int(s) for s in steps}))
    bad = [s for s in steps if not 1 <= s <= 200]
    if not steps or bad:
        raise ExportError(f"Heun step counts must be integers in [1, 200]; got {list(steps) or 'none'}")
    return steps


# ----------------------------------------------------------------------------------------------- graph specs
def _io(model: TrigFlowModel) -> tuple[tuple[int, int, int], bool]:
    cfg = require_image_model(model)
    return (cfg.img_channels, cfg.img_resolution, cfg.img_resolution), model.num_classes > 0


def consistency_graph(model: TrigFlowModel, steps: int, ts: list[float] | None = None) -> ExportGraph:
    """sCM 1- or 2-step sampler at times `ts` (None: the core defaults): noise[, noise2][, class_labels] -> images
    (uint8 NHWC)."""
    (c, h, w), cond = _io(model)
    inputs = [_t("noise", "float32", ("batch", c, h, w))]
    inputs += [_t(f"noise{k + 1}", "float32", ("batch", c, h, w)) for k in range(1, steps)]
    if cond:
        inputs.append(_t("class_labels", "int64", ("batch",)))
    out = (_t("images", "uint8", ("batch", h, w, c)),)
    return ExportGraph(str(steps), f"generator_{steps}step.onnx", generator_module(model, "consistency", steps, ts=ts).eval(),
                     tuple(inputs), out, "generator")


def heun_graph(model: TrigFlowModel, num_steps: int) -> ExportGraph:
    """EDM Heun sampler unrolled over num_steps: noise[, class_labels] -> images (uint8 NHWC)."""
    (c, h, w), cond = _io(model)
    inputs = [_t("noise", "float32", ("batch", c, h, w))]
    if cond:
        inputs.append(_t("class_labels", "int64", ("batch",)))
    out = (_t("images", "uint8", ("batch", h, w, c)),)
    return ExportGraph(str(num_steps), f"generator_heun{num_steps}.onnx", generator_module(model, "diffusion", num_steps).eval(),
                     tuple(inputs), out, "generator")


def denoiser_graph(model: TrigFlowModel) -> ExportGraph:
    """The raw network: x_t, t[, class_labels] -> F_theta(x_t / sigma_d, t, y)."""
    (c, h, w), cond = _io(model)
    inputs = [_t("x_t", "float32", ("batch", c, h, w)), _t("t", "float32", ("batch",))]
    if cond:
        inputs.append(_t("class_labels", "int64", ("batch",)))
    out = (_t("F", "float32", ("batch", c, h, w)),)
    return ExportGraph("denoiser", "denoiser.onnx", DenoiserGraph(model).eval(), tuple(inputs), out, "denoiser")


def example_inputs(spec: ExportGraph, batch: int, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for `spec` at `batch`: N(0, I) noise, uniform labels, x_t ~ N(0, sigma_d^2), t ~ U(0.05, 1.55)."""
    rng = np.random.default_rng([seed, batch])
    feeds: dict[str, np.ndarray] = {}
    for s in spec.inputs:
        shape = tuple(batch if d == "batch" else int(d) for d in s.shape)
        if s.name == "class_labels":
            feeds[s.name] = rng.integers(0, max(num_classes, 1), size=shape, dtype=np.int64)
        elif s.name == "t":
            feeds[s.name] = rng.uniform(0.05, 1.55, size=shape).astype(np.float32)
        elif s.name == "x_t":
            feeds[s.name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        else:
            feeds[s.name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def run_torch(spec: ExportGraph, feeds: dict[str, np.ndarray], device: str = "cpu") -> np.ndarray:
    """The eager fp32 reference output of `spec.module` for numpy feeds."""
    args = [torch.from_numpy(feeds[s.name]).to(device) for s in spec.inputs]
    with torch.no_grad():
        return spec.module(*args).cpu().numpy()


# ----------------------------------------------------------------------------------------------- export
class HalfCompute(nn.Module):
    """A Conv2d/Linear run in fp16 between fp32 activations: fp32 x -> fp16 layer -> fp32 (mixed precision)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = copy.deepcopy(layer).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.half()).float()


def half_compute(module: nn.Module) -> nn.Module:
    """A copy of `module` whose Conv2d and Linear layers compute in fp16 (HalfCompute); all else stays fp32."""

    def convert(m: nn.Module) -> None:
        for name, child in m.named_children():
            if isinstance(child, (nn.Conv2d, nn.Linear)):
                setattr(m, name, HalfCompute(child))
            elif not isinstance(child, HalfCompute):
                convert(child)

    out = copy.deepcopy(module)
    convert(out)
    return out.eval()


def _legacy_kwargs() -> dict[str, Any]:
    """`dynamo=False` where torch.onnx.export has the parameter (torch >= 2.5), nothing before."""
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def _import_onnx():
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - onnx is in the export extra
        raise MissingDependencyError("the 'onnx' package is missing; install the export extra: "
                                     "pip install 'quickstep[export]'") from e
    return onnx


def export_onnx(spec: ExportGraph, path: str | Path, *, opset: int = 17, fp16: bool = False, num_classes: int = 0) -> float:
    """Export `spec.module` to `path` (single file, dynamic batch axis) and run onnx.checker; returns seconds."""
    check_opset(opset)
    onnx = _import_onnx()
    feeds = example_inputs(spec, EXAMPLE_BATCH, num_classes, seed=12345)
    args = tuple(torch.from_numpy(feeds[s.name]) for s in spec.inputs)
    names = [s.name for s in spec.inputs] + [s.name for s in spec.outputs]
    module = half_compute(spec.module) if fp16 else spec.module
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about python floats and the legacy-exporter notice
        torch.onnx.export(
            module, args, str(path),
            input_names=[s.name for s in spec.inputs],
            output_names=[s.name for s in spec.outputs],
            dynamic_axes={n: {0: "batch"} for n in names},
            opset_version=opset, do_constant_folding=True, **_legacy_kwargs(),
        )
    seconds = time.perf_counter() - t0
    onnx.checker.check_model(str(path), full_check=True)
    return seconds


# ----------------------------------------------------------------------------------------------- shared weights
SHARED_DATA = "weights.onnx.data"
DATA_ALIGN = 4096  # page-aligned offsets: onnxruntime can memory-map every tensor


def share_weights(paths: Sequence[str | Path], data_name: str = SHARED_DATA, *, min_bytes: int = 1024) -> dict[str, int]:
    """Move the initializers of several ONNX graphs in one directory into one deduplicated external-data file.

    The 1- and 2-step generators and the denoiser hold the same network weights; ONNX's external-data mechanism
    (`data_location = EXTERNAL`, location/offset/length) lets each graph point into one file `data_name` next to
    it, so a bundle stores its weights once.  Tensors are deduplicated by content (sha256), so constants that
    the exporter folded differently are still stored correctly.  Tensors under `min_bytes` stay inline.
    Every rewritten graph is checked to give bit-identical outputs; returns counts for the export log."""
    onnx = _import_onnx()
    from onnx.external_data_helper import set_external_data

    paths = [Path(p) for p in paths]
    folder = paths[0].parent
    if any(p.parent != folder for p in paths):
        raise ExportError("share_weights: every graph must be in the same directory")
    before = {p: _sample_outputs(p) for p in paths}
    offsets: dict[str, tuple[int, int]] = {}  # sha256 -> (offset, length)
    stats = {"tensors": 0, "unique": 0, "inline_bytes": 0, "data_bytes": 0}
    with open(folder / data_name, "wb") as data:
        for p in paths:
            model = onnx.load(str(p))
            for t in model.graph.initializer:
                raw = t.raw_data
                if len(raw) < min_bytes:
                    stats["inline_bytes"] += len(raw)
                    continue
                key = hashlib.sha256(raw).hexdigest()
                if key not in offsets:
                    pad = -data.tell() % DATA_ALIGN
                    data.write(b"\0" * pad)
                    offsets[key] = (data.tell(), len(raw))
                    data.write(raw)
                    stats["unique"] += 1
                stats["tensors"] += 1
                offset, length = offsets[key]
                set_external_data(t, location=data_name, offset=offset, length=length)
                t.ClearField("raw_data")
            onnx.save_model(model, str(p))
        stats["data_bytes"] = data.tell()
    for p in paths:
        onnx.checker.check_model(str(p), full_check=True)
        after = _sample_outputs(p)
        if any(not np.array_equal(a, b) for a, b in zip(before[p], after, strict=True)):
            raise ExportError(f"{p.name}: outputs changed after moving its weights to {data_name}")
    return stats


def _sample_outputs(path: Path) -> list[np.ndarray]:
    """The graph's outputs on fixed random inputs (batch 2): a fingerprint to compare rewrites against."""
    sess = ort_session(path, threads=1)
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        shape = [2 if not isinstance(d, int) else d for d in i.shape]
        feeds[i.name] = (rng.integers(0, 2, shape).astype(np.int64) if "int" in i.type
                         else rng.standard_normal(shape).astype(np.float16 if "float16" in i.type else np.float32))
    return sess.run(None, feeds)


# ----------------------------------------------------------------------------------------------- onnxruntime
def ort_session(path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = None):
    """An onnxruntime InferenceSession on `providers` (imported lazily)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MissingDependencyError("onnxruntime is missing; install the export extra: "
                                     "pip install 'quickstep[export]'") from e
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-wait on shared CPUs
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))


def max_error(spec: ExportGraph, got: np.ndarray, ref: np.ndarray) -> float:
    """uint8 graphs: max |diff| in grey levels; float graphs: max |diff| / max(1, max |ref|)."""
    if got.shape != ref.shape:
        return float("inf")
    if spec.kind == "generator":
        return float(np.abs(got.astype(np.int32) - ref.astype(np.int32)).max(initial=0))
    return float(np.abs(got.astype(np.float64) - ref).max(initial=0.0) / max(1.0, float(np.abs(ref).max(initial=0.0))))


def tolerance(spec: ExportGraph, precision: str) -> float:
    """The parity tolerance of `spec` at `precision` ('fp32' | 'fp16')."""
    table = GENERATOR_TOLERANCE if spec.kind == "generator" else DENOISER_TOLERANCE
    return float(table[precision])


def parity_check(
    spec: ExportGraph, run, batches: Sequence[int], *, num_classes: int, precision: str = "fp32",
    tol: float | None = None, seed: int = 0, device: str = "cpu",
) -> ParityEntry:
    """Compare `run(feeds) -> ndarray` with the eager torch module at each batch size; a manifest parity entry."""
    tol = tolerance(spec, precision) if tol is None else float(tol)
    errs = {}
    for b in batches:
        feeds = example_inputs(spec, int(b), num_classes, seed=seed)
        errs[int(b)] = max_error(spec, np.asarray(run(feeds)), run_torch(spec, feeds, device))
    return ParityEntry(units=parity_units(spec), max_abs_err=errs, tolerance=tol,
                       passed=bool(max(errs.values(), default=0.0) <= tol))


def parity_units(spec: ExportGraph) -> str:
    """What a parity error of `spec` counts: grey levels of a uint8 generator, relative error of the denoiser."""
    return "uint8 levels" if spec.kind == "generator" else "relative max abs"


def onnx_parity(spec: ExportGraph, path: str | Path, batches: Sequence[int], *, num_classes: int,
                precision: str = "fp32", tol: float | None = None) -> ParityEntry:
    """onnxruntime (CPU) vs eager torch at each batch size."""
    sess = ort_session(path, threads=1)  # parity batches are small; one thread avoids oversubscription
    return parity_check(spec, lambda feeds: sess.run(None, feeds)[0], batches, num_classes=num_classes,
                        precision=precision, tol=tol)
