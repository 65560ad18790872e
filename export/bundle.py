"""Bundles: the export output the server loads (format: docs/bundle.md).

`export_bundle` turns a checkpoint into a directory of ONNX graphs + torch weights + manifest.json (sha256 of
every file, parity results), written atomically: it appears complete or not at all, and never when a graph
fails its parity gate.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from pathlib import Path

from quickstep.train.core.checkpoint import (
    CONFIG,
    WEIGHTS,
    CheckpointError,
    atomic_write_dir,
    load_meta,
    load_model,
    load_weights,
)

from quickstep import __version__
from quickstep.artifacts import (
    KINDS,
    MANIFEST,
    BundleError,
    BundleManifest,
    CheckpointMeta,
    FileEntry,
    Parity,
    ParityEntry,
    SamplerSpec,
    TorchFiles,
    sha256_file,
)

from .onnx import (
    EXPORTER,
    SHARED_DATA,
    ExportError,
    ExportGraph,
    ParityError,
    check_consistency_steps,
    check_heun_steps,
    check_opset,
    consistency_graph,
    denoiser_graph,
    export_onnx,
    heun_graph,
    onnx_parity,
    require_image_model,
    share_weights,
)

__all__ = ["MANIFEST", "BundleError", "bundle_graph_specs", "bundle_model", "export_bundle", "file_table",
           "read_manifest", "refresh_files", "write_manifest"]


def check_kind(kind: str | None, meta: CheckpointMeta) -> str:
    """The kind to export: an explicit `kind` (validated), else the one the checkpoint records."""
    if kind is None:
        return meta.kind
    if kind not in KINDS:
        raise ExportError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    return kind


# ----------------------------------------------------------------------------------------------- files
def file_table(bundle: str | Path) -> dict[str, FileEntry]:
    """{relative path: {sha256, bytes}} for every file in the bundle except manifest.json."""
    bundle = Path(bundle)
    return {p.relative_to(bundle).as_posix(): FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size)
            for p in sorted(bundle.rglob("*")) if p.is_file() and p.name != MANIFEST}


def read_manifest(bundle: str | Path) -> BundleManifest:
    """manifest.json of a bundle directory (BundleError when missing or not a Quickstep bundle)."""
    return BundleManifest.read(bundle)


def write_manifest(bundle: str | Path, manifest: BundleManifest) -> Path:
    """Write manifest.json atomically (temporary file, fsync, rename)."""
    return manifest.write(bundle)


def refresh_files(bundle: str | Path, manifest: BundleManifest) -> BundleManifest:
    """Recompute the manifest's `files` table from disk and write it (after adding .pt2 / .plan files)."""
    manifest.files = file_table(bundle)
    write_manifest(bundle, manifest)
    return manifest


# ----------------------------------------------------------------------------------------------- export
def _graph_specs(model, kind: str, steps: Sequence[int], heun_steps: Sequence[int],
                 sampler: SamplerSpec | None) -> list[ExportGraph]:
    """The generator graphs; consistency graphs bake in the sampler times the checkpoint records (if any)."""
    if kind == "consistency":
        return [consistency_graph(model, s, ts=sampler.times_for(s) if sampler is not None else None)
                for s in check_consistency_steps(steps)]
    return [heun_graph(model, n) for n in check_heun_steps(heun_steps)]


def _parity_message(spec: ExportGraph, entry: ParityEntry) -> str:
    return (f"parity check failed for {spec.filename}: onnxruntime vs torch max error {entry.errors_text()} "
            f"({entry.units}) exceeds tolerance {entry.tolerance:g}; bundle not written")


def export_bundle(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    steps: Sequence[int] = (1, 2),
    kind: str | None = None,
    opset: int = 17,
    fp16: bool = False,
    name: str | None = None,
    heun_steps: Sequence[int] = (18,),
    parity_batches: Sequence[int] = (1, 7),
    tolerance: float | None = None,
    denoiser_tolerance: float | None = None,
) -> Path:
    """Export a checkpoint to a bundle at `out_dir` (ONNX graphs, denoiser.onnx, their shared weights file
    weights.onnx.data, torch weights, manifest.json).

    Consistency bundles get generator_{n}step.onnx for n in `steps` (subset of {1, 2}); diffusion bundles get
    generator_heun{n}.onnx for n in `heun_steps`.  Every bundle gets denoiser.onnx.  Each graph must match the
    eager torch module at every batch in `parity_batches` (uint8 levels <= `tolerance`, default 1 for fp32), else
    ParityError and nothing is written.
    """
    check_opset(opset)
    ckpt_dir = Path(ckpt_dir)
    try:
        meta = load_meta(ckpt_dir)
        model = load_model(ckpt_dir)
    except CheckpointError as e:
        raise ExportError(f"cannot export {str(ckpt_dir)!r}: {e}") from e
    require_image_model(model)
    kind = check_kind(kind, meta)
    specs = _graph_specs(model, kind, steps, heun_steps, meta.sampler if meta.kind == kind else None)
    precision = "fp16" if fp16 else "fp32"
    num_classes = model.num_classes
    batches = [int(b) for b in parity_batches]
    if not batches or min(batches) < 1:
        raise ExportError(f"parity batches must be positive integers, got {list(parity_batches)}")
    name = name or meta.name or ckpt_dir.resolve().name
    timings: dict[str, float] = {}
    parity = Parity(onnxruntime={})

    def write(tmp: Path) -> None:
        for spec in [*specs, denoiser_graph(model)]:
            timings[spec.filename] = round(export_onnx(spec, tmp / spec.filename, opset=opset, fp16=fp16,
                                                       num_classes=num_classes), 3)
            tol = denoiser_tolerance if spec.kind == "denoiser" else tolerance
            entry = onnx_parity(spec, tmp / spec.filename, batches, num_classes=num_classes,
                                precision=precision, tol=tol)
            parity.record("onnxruntime", spec.key, entry)
            if not entry.passed:
                raise ParityError(_parity_message(spec, entry))
        shared = share_weights([tmp / spec.filename for spec in [*specs, denoiser_graph(model)]])
        write_ema_weights(ckpt_dir, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(meta.to_json(), indent=2, sort_keys=True) + "\n")
        manifest = build_manifest(model, meta, kind=kind, name=str(name), specs=specs, opset=opset,
                                  precision=precision, parity=parity, timings=timings)
        manifest.onnx_external_data = {"file": SHARED_DATA, **shared}
        manifest.files = file_table(tmp)
        write_manifest(tmp, manifest)

    return atomic_write_dir(out_dir, write)


def write_ema_weights(ckpt_dir: Path, dest: Path) -> None:
    """The bundle's torch weights: only the checkpoint's EMA tensors (what every backend serves), half the size."""
    from safetensors.torch import save_file

    tensors = load_weights(ckpt_dir)
    ema = {k: v for k, v in tensors.items() if k.startswith("ema.")} or tensors
    save_file(ema, str(dest), metadata={"format": "quickstep-checkpoint"})


def build_manifest(model, meta: CheckpointMeta, *, kind: str, name: str, specs: Sequence[ExportGraph], opset: int,
                   precision: str, parity: Parity, timings: dict[str, float]) -> BundleManifest:
    """The manifest (docs/bundle.md) without its `files` table: the graphs, the sampler times, the checkpoint's
    teacher reference and class names."""
    from quickstep.train.core.trigflow import sigma_to_t

    keys = [int(s.key) for s in specs]
    times: dict[str, list[float]] = {}
    sigmas: dict[str, list[float]] = {}
    for s in specs:
        if kind == "consistency":
            times[s.key] = [float(t) for t in s.module.ts]
        else:
            sig = [float(x) for x in s.module.sigmas]
            sigmas[s.key] = sig
            times[s.key] = [float(sigma_to_t(x, model.sigma_data)) for x in sig]
    den = denoiser_graph(model)
    data = meta.data
    return BundleManifest(
        name=name, kind=kind, image_shape=tuple(model.sample_shape), num_classes=int(model.num_classes),
        class_names=data.class_names if data is not None else None,
        class_aliases=data.class_aliases if data is not None else {},
        steps_supported=keys, default_steps=1 if 1 in keys and kind == "consistency" else keys[0],
        sigma_data=float(model.sigma_data), times=times,
        sigmas=sigmas or None, nfe={k: 2 * int(k) - 1 for k in sigmas} or None,
        graphs={s.key: s.entry(onnx=s.filename) for s in specs},
        denoiser=den.entry(onnx=den.filename),
        torch=TorchFiles(weights=WEIGHTS, config=CONFIG),
        exporter=EXPORTER, opset=int(opset), precision=precision, parity=parity, export_seconds=timings,
        teacher=meta.teacher,
        created=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), quickstep_version=__version__,
    )


def bundle_model(bundle: str | Path, device: str = "cpu"):
    """The TrigFlowModel of a bundle (its config.json + model.safetensors, EMA weights)."""
    try:
        return load_model(bundle, map_location=device)
    except CheckpointError as e:
        raise BundleError(f"cannot load the torch model of bundle {str(bundle)!r}: {e}") from e


def bundle_graph_specs(bundle: str | Path, manifest: BundleManifest, model=None) -> list[ExportGraph]:
    """ExportGraphs (torch modules + I/O) for every generator graph in a bundle's manifest."""
    model = model if model is not None else bundle_model(bundle)
    keys = sorted(manifest.graphs, key=int)
    if manifest.kind == "consistency":
        return [consistency_graph(model, int(k), ts=manifest.consistency_times(int(k))) for k in keys]
    return [heun_graph(model, int(k)) for k in keys]
