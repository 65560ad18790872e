"""A Triton Inference Server model repository from a bundle: one model per graph, dynamic batching on.

    quickstep-export triton --bundle BUNDLE --out REPO [--backend onnxruntime|tensorrt] [--max-batch 32]

writes, for a consistency bundle named NAME,

    REPO/NAME_1step/config.pbtxt      platform "onnxruntime_onnx" (or "tensorrt_plan"), max_batch_size,
    REPO/NAME_1step/1/model.onnx      dims without the batch axis, dynamic_batching
    REPO/NAME_2step/...               (2-step graph; diffusion bundles give NAME_heun18)
    REPO/NAME_denoiser/...            (onnxruntime backend only: x_t, t[, class_labels] -> F)

which Triton loads unmodified:

    docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 -v $PWD/REPO:/models \\
        nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models
    # or, with tritonserver installed locally:
    tritonserver --model-repository=REPO

then `curl localhost:8000/v2/models/NAME_1step` shows the I/O; inputs are standard-normal `noise` [B, C, H, W]
(FP32; `noise2` too for 2 steps) and `class_labels` [B] (INT64, conditional models), output `images`
[B, H, W, C] UINT8.  A TensorRT plan must come from the same TensorRT version as the Triton container's and be
built on the same GPU model (`quickstep-export tensorrt` on that machine first).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quickstep.train.core.checkpoint import atomic_write_dir

from quickstep.artifacts import GraphEntry, triton_model_name, triton_name

from .bundle import read_manifest
from .onnx import ExportError

BACKENDS = ("onnxruntime", "tensorrt")
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
MODEL_FILES = {"onnxruntime": "model.onnx", "tensorrt": "model.plan"}
DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
          "uint8": "TYPE_UINT8"}
INSTANCE_KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}


def _dims(shape: Sequence[Any]) -> tuple[list[int], list[int] | None]:
    """(dims without the batch axis, reshape or None): a per-sample scalar [B] becomes dims [1], reshape []."""
    dims = [int(d) for d in shape[1:]]
    return (dims, None) if dims else ([1], [])


def _tensor_block(spec: dict[str, Any]) -> str:
    dims, reshape = _dims(spec["shape"])
    lines = ["  {", f'    name: "{spec["name"]}"', f"    data_type: {DTYPES[spec['dtype']]}",
             f"    dims: [ {', '.join(str(d) for d in dims)} ]"]
    if reshape is not None:
        lines.append(f"    reshape: {{ shape: [ {', '.join(str(d) for d in reshape)} ] }}")
    lines.append("  }")
    return "\n".join(lines)


def model_config(name: str, io: dict[str, Any], *, backend: str, max_batch: int, max_queue_delay_us: int,
                 instance_kind: str = "auto", instance_count: int = 1) -> str:
    """config.pbtxt text for one graph."""
    parts = [f'name: "{name}"', f'platform: "{PLATFORMS[backend]}"', f"max_batch_size: {int(max_batch)}",
             "input [\n" + ",\n".join(_tensor_block(s) for s in io["inputs"]) + "\n]",
             "output [\n" + ",\n".join(_tensor_block(s) for s in io["outputs"]) + "\n]",
             "dynamic_batching {\n"
             f"  preferred_batch_size: [ {int(max_batch)} ]\n"
             f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}\n}}"]
    if instance_kind != "auto":
        parts.append(f"instance_group [\n  {{\n    count: {int(instance_count)}\n"
                     f"    kind: {INSTANCE_KINDS[instance_kind]}\n  }}\n]")
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------- validation
_MODEL_CONFIG_MSG = None


def model_config_message():
    """A protobuf message class for the subset of Triton's `inference.ModelConfig` (model_config.proto) we
    write: same message, field and enum names and numbers, built at run time with descriptor_pb2."""
    global _MODEL_CONFIG_MSG  # noqa: PLW0603 - one descriptor pool per process, built lazily
    if _MODEL_CONFIG_MSG is not None:
        return _MODEL_CONFIG_MSG
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="quickstep_triton_model_config.proto", package="inference",
                                             syntax="proto3")
    dt = fdp.enum_type.add(name="DataType")
    for i, n in enumerate(["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64",
                           "TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32",
                           "TYPE_FP64", "TYPE_STRING", "TYPE_BF16"]):
        dt.value.add(name=n, number=i)

    def msg(name, fields):
        m = fdp.message_type.add(name=name)
        for fname, num, ftype, label, tname in fields:
            f = m.field.add(name=fname, number=num, type=ftype, label=label)
            if tname:
                f.type_name = tname
        return m

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    msg("ModelTensorReshape", [("shape", 1, F.TYPE_INT64, rep, None)])
    msg("ModelInput", [("name", 1, F.TYPE_STRING, opt, None), ("data_type", 2, F.TYPE_ENUM, opt, ".inference.DataType"),
                       ("dims", 4, F.TYPE_INT64, rep, None),
                       ("reshape", 5, F.TYPE_MESSAGE, opt, ".inference.ModelTensorReshape"),
                       ("optional", 8, F.TYPE_BOOL, opt, None)])
    msg("ModelOutput", [("name", 1, F.TYPE_STRING, opt, None), ("data_type", 2, F.TYPE_ENUM, opt, ".inference.DataType"),
                        ("dims", 3, F.TYPE_INT64, rep, None),
                        ("reshape", 5, F.TYPE_MESSAGE, opt, ".inference.ModelTensorReshape")])
    msg("ModelDynamicBatching", [("preferred_batch_size", 1, F.TYPE_INT32, rep, None),
                                 ("max_queue_delay_microseconds", 2, F.TYPE_UINT64, opt, None),
                                 ("preserve_ordering", 3, F.TYPE_BOOL, opt, None)])
    ig = msg("ModelInstanceGroup", [("name", 1, F.TYPE_STRING, opt, None), ("count", 2, F.TYPE_INT32, opt, None),
                                    ("gpus", 3, F.TYPE_INT32, rep, None),
                                    ("kind", 4, F.TYPE_ENUM, opt, ".inference.ModelInstanceGroup.Kind")])
    kind = ig.enum_type.add(name="Kind")
    for i, n in enumerate(["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]):
        kind.value.add(name=n, number=i)
    msg("ModelConfig", [("name", 1, F.TYPE_STRING, opt, None), ("platform", 2, F.TYPE_STRING, opt, None),
                        ("max_batch_size", 4, F.TYPE_INT32, opt, None),
                        ("input", 5, F.TYPE_MESSAGE, rep, ".inference.ModelInput"),
                        ("output", 6, F.TYPE_MESSAGE, rep, ".inference.ModelOutput"),
                        ("instance_group", 7, F.TYPE_MESSAGE, rep, ".inference.ModelInstanceGroup"),
                        ("dynamic_batching", 11, F.TYPE_MESSAGE, opt, ".inference.ModelDynamicBatching"),
                        ("backend", 17, F.TYPE_STRING, opt, None)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    _MODEL_CONFIG_MSG = message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))
    return _MODEL_CONFIG_MSG


def parse_model_config(text: str):
    """Parse config.pbtxt text into a ModelConfig message (google.protobuf.text_format.ParseError if malformed)."""
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_message()())


def check_against_onnx(config, onnx_path: str | Path) -> list[str]:
    """Problems between a parsed ModelConfig and the ONNX graph it serves: names, dtypes, per-sample dims."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    onnx_dt = {v: k for k, v in {"TYPE_FP32": onnx.TensorProto.FLOAT, "TYPE_FP16": onnx.TensorProto.FLOAT16,
                                 "TYPE_INT64": onnx.TensorProto.INT64, "TYPE_INT32": onnx.TensorProto.INT32,
                                 "TYPE_UINT8": onnx.TensorProto.UINT8}.items()}
    dt_name = model_config_message().DESCRIPTOR.file.pool.FindEnumTypeByName("inference.DataType").values_by_number
    problems = []
    for kind, declared, actual in (("input", config.input, [v for v in graph.input if v.name not in inits]),
                                   ("output", config.output, list(graph.output))):
        by_name = {v.name: v for v in actual}
        if {d.name for d in declared} != set(by_name):
            problems.append(f"{kind}s {sorted(d.name for d in declared)} != ONNX graph {kind}s {sorted(by_name)}")
        for d in declared:
            v = by_name.get(d.name)
            if v is None:
                continue
            tt = v.type.tensor_type
            if onnx_dt.get(tt.elem_type) != dt_name[d.data_type].name:
                problems.append(f"{kind} {d.name}: data_type {dt_name[d.data_type].name} vs ONNX elem_type {tt.elem_type}")
            onnx_dims = [x.dim_value if x.HasField("dim_value") else -1 for x in tt.shape.dim][1:]
            want = list(d.reshape.shape) if d.HasField("reshape") else list(d.dims)
            if onnx_dims != want:
                problems.append(f"{kind} {d.name}: per-sample dims {want} vs ONNX {onnx_dims}")
    return problems


# ----------------------------------------------------------------------------------------------- writing
def _plan_for(graph: GraphEntry, engine: str | None) -> str:
    plans = dict(graph.tensorrt_plans)
    if not plans and graph.tensorrt:
        plans = {"default": graph.tensorrt}
    if not plans:
        raise ExportError("this bundle has no TensorRT plans; run `quickstep-export tensorrt --bundle B` on the "
                          "target GPU first, or use --backend onnxruntime")
    if engine is None:
        if len(plans) > 1:
            raise ExportError(f"the bundle has plans for several GPUs/TensorRT versions {sorted(plans)}; pick one "
                              "with --engine")
        return next(iter(plans.values()))
    if engine not in plans:
        raise ExportError(f"no TensorRT plan tagged {engine!r}; available: {sorted(plans)}")
    return plans[engine]


def write_triton_repository(
    bundle: str | Path, out: str | Path, *, backend: str = "onnxruntime", max_batch: int = 32,
    max_queue_delay_us: int = 2000, instance_kind: str = "auto", instance_count: int = 1,
    engine: str | None = None, include_denoiser: bool = True,
) -> dict[str, Path]:
    """Write one Triton model per bundle graph under `out`; returns {model name: model directory}."""
    if backend not in BACKENDS:
        raise ExportError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if instance_kind not in INSTANCE_KINDS:
        raise ExportError(f"instance kind must be one of {list(INSTANCE_KINDS)}, got {instance_kind!r}")
    if not 1 <= int(max_batch) <= 4096:
        raise ExportError(f"max batch must be in [1, 4096], got {max_batch}")
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    base = triton_name(manifest.name)
    models: list[tuple[str, dict[str, Any], Path]] = []
    for key, graph in sorted(manifest.graphs.items(), key=lambda kv: int(kv[0])):
        if backend == "onnxruntime" and not graph.onnx:
            raise ExportError(f"the bundle's graph for steps={key} has no ONNX file")
        src = bundle / (graph.onnx if backend == "onnxruntime" else _plan_for(graph, engine))
        models.append((triton_model_name(manifest.name, manifest.kind, int(key)), graph.io_dict(), src))
    den = manifest.denoiser
    if include_denoiser and backend == "onnxruntime" and den is not None and den.onnx:
        models.append((f"{base}_denoiser", den.io_dict(), bundle / den.onnx))
    shared = manifest.onnx_external_data.file if manifest.onnx_external_data is not None else ""
    written: dict[str, Path] = {}
    for name, io, src in models:
        text = model_config(name, io, backend=backend, max_batch=max_batch, max_queue_delay_us=max_queue_delay_us,
                            instance_kind=instance_kind, instance_count=instance_count)
        if backend == "onnxruntime":
            problems = check_against_onnx(parse_model_config(text), src)
            if problems:
                raise ExportError(f"generated config for {name} does not match {src.name}: " + "; ".join(problems))

        def write(tmp: Path, text=text, src=src) -> None:
            (tmp / "config.pbtxt").write_text(text)
            (tmp / "1").mkdir()
            shutil.copyfile(src, tmp / "1" / MODEL_FILES[backend])
            if backend == "onnxruntime" and (bundle / shared).is_file():  # the graph's external weights
                shutil.copyfile(bundle / shared, tmp / "1" / shared)

        written[name] = atomic_write_dir(Path(out) / name, write)
    return written
