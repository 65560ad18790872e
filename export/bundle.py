"""Bundles: the export output the server loads (format: docs/bundle.md).

`export_bundle` turns a checkpoint into a directory of ONNX graphs + torch weights + manifest.json (sha256 of
every file, parity results), written atomically: it appears complete or not at all, and never when a graph
fails its parity gate.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quickstep.train.core.checkpoint import (
    CONFIG,
    WEIGHTS,
    CheckpointError,
    atomic_write_dir,
    load_config,
    load_model,
    load_weights,
    recorded_times,
    sha256_file,
)

from .onnx import (
    EXPORTER,
    SHARED_DATA,
    ExportError,
    GraphSpec,
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

FORMAT = "quickstep-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("consistency", "diffusion")
CONSISTENCY_OBJECTIVES = {"sct", "scd", "direct_cm", "cd", "ct", "consistency"}


class BundleError(ValueError):
    """A bundle directory is missing, unreadable or inconsistent."""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("quickstep")
    except Exception:  # noqa: BLE001 - metadata is optional in a source checkout
        return "0.0.0"


# ----------------------------------------------------------------------------------------------- kind
def _objective_names(cfg: dict[str, Any]) -> list[str]:
    """Objective names found in a checkpoint config (the trainer's `objectives` table, train.objective, ...)."""
    found: list[str] = []
    for section in (cfg, cfg.get("train") if isinstance(cfg.get("train"), dict) else {}):
        objectives = section.get("objectives") if isinstance(section, dict) else None
        if isinstance(objectives, dict):
            found.extend(str(k) for k in objectives)
        obj = section.get("objective") if isinstance(section, dict) else None
        if isinstance(obj, str):
            found.append(obj)
        elif isinstance(obj, dict):
            for k in ("name", "kind", "type"):
                if isinstance(obj.get(k), str):
                    found.append(obj[k])
    return [s.lower() for s in found]


def class_names(cfg: dict[str, Any], num_classes: int) -> list[str] | None:
    """The checkpoint's index-aligned class names (config.json `class_names`, written by the trainer from the data),
    or None when absent or not one string per class."""
    names = cfg.get("class_names")
    if isinstance(names, list) and num_classes > 0 and len(names) == num_classes and all(
            isinstance(n, str) for n in names):
        return [str(n) for n in names]
    return None


def detect_kind(cfg: dict[str, Any], kind: str | None = None) -> str:
    """'consistency' or 'diffusion': the explicit `kind`, else config['kind'], else the training objective."""
    if kind is not None:
        if kind not in KINDS:
            raise ExportError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        return kind
    if cfg.get("kind") in KINDS:
        return str(cfg["kind"])
    names = _objective_names(cfg)
    if any(n in CONSISTENCY_OBJECTIVES for n in names):
        return "consistency"
    if names:
        return "diffusion"
    raise ExportError("cannot tell whether this checkpoint is a consistency or a diffusion model (config.json has "
                      "no 'kind' and no training objectives); pass --kind consistency|diffusion")


# ----------------------------------------------------------------------------------------------- files
def file_table(bundle: str | Path) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, bytes}} for every file in the bundle except manifest.json."""
    bundle = Path(bundle)
    return {p.relative_to(bundle).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(bundle.rglob("*")) if p.is_file() and p.name != MANIFEST}


def read_manifest(bundle: str | Path) -> dict[str, Any]:
    """manifest.json of a bundle directory (BundleError when missing or not a Quickstep bundle)."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"bundle directory {str(bundle)!r} does not exist")
    f = bundle / MANIFEST
    if not f.exists():
        raise BundleError(f"{str(bundle)!r} has no {MANIFEST}; is it a Quickstep bundle?")
    try:
        m = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{f} is not valid JSON: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"{f} is not a {FORMAT} manifest")
    return m


def write_manifest(bundle: str | Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json atomically (temporary file, fsync, rename)."""
    bundle = Path(bundle)
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=bundle)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600: a server running as another user must read it
    os.replace(tmp, bundle / MANIFEST)
    return bundle / MANIFEST


def refresh_files(bundle: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Recompute the manifest's `files` table from disk and write it (after adding .pt2 / .plan files)."""
    manifest["files"] = file_table(bundle)
    write_manifest(bundle, manifest)
    return manifest


# ----------------------------------------------------------------------------------------------- export
def _graph_specs(model, kind: str, steps: Sequence[int], heun_steps: Sequence[int],
                 times: dict[int, list[float]] | None = None) -> list[GraphSpec]:
    """The generator graphs; consistency graphs bake in the checkpoint's recorded sampler times when it has them."""
    if kind == "consistency":
        times = times or {}
        return [consistency_graph(model, s, ts=times.get(s)) for s in check_consistency_steps(steps)]
    return [heun_graph(model, n) for n in check_heun_steps(heun_steps)]


def _parity_message(spec: GraphSpec, entry: dict[str, Any]) -> str:
    errs = ", ".join(f"{k[len('max_abs_err_'):]}={v:g}" for k, v in entry.items() if k.startswith("max_abs_err_"))
    return (f"parity check failed for {spec.filename}: onnxruntime vs torch max error {errs} ({entry['units']}) "
            f"exceeds tolerance {entry['tolerance']:g}; bundle not written")


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
        cfg = load_config(ckpt_dir)
        model = load_model(ckpt_dir)
    except CheckpointError as e:
        raise ExportError(f"cannot export {str(ckpt_dir)!r}: {e}") from e
    require_image_model(model)
    kind = detect_kind(cfg, kind)
    try:
        times = recorded_times(cfg)
    except CheckpointError as e:
        raise ExportError(f"cannot export {str(ckpt_dir)!r}: {e}") from e
    specs = _graph_specs(model, kind, steps, heun_steps, times)
    precision = "fp16" if fp16 else "fp32"
    num_classes = model.num_classes
    batches = [int(b) for b in parity_batches]
    if not batches or min(batches) < 1:
        raise ExportError(f"parity batches must be positive integers, got {list(parity_batches)}")
    name = name or cfg.get("name") or ckpt_dir.resolve().name
    timings: dict[str, float] = {}
    parity: dict[str, Any] = {"onnxruntime": {}}

    def write(tmp: Path) -> None:
        for spec in [*specs, denoiser_graph(model)]:
            timings[spec.filename] = round(export_onnx(spec, tmp / spec.filename, opset=opset, fp16=fp16,
                                                       num_classes=num_classes), 3)
            tol = denoiser_tolerance if spec.kind == "denoiser" else tolerance
            entry = onnx_parity(spec, tmp / spec.filename, batches, num_classes=num_classes,
                                precision=precision, tol=tol)
            parity["onnxruntime"][spec.key] = entry
            if not entry["passed"]:
                raise ParityError(_parity_message(spec, entry))
        shared = share_weights([tmp / spec.filename for spec in [*specs, denoiser_graph(model)]])
        write_ema_weights(ckpt_dir, tmp / WEIGHTS)
        shutil.copyfile(ckpt_dir / CONFIG, tmp / CONFIG)
        manifest = build_manifest(model, cfg, kind=kind, name=str(name), specs=specs, opset=opset,
                                  precision=precision, parity=parity, timings=timings)
        manifest["onnx_external_data"] = {"file": SHARED_DATA, **shared}
        manifest["files"] = file_table(tmp)
        write_manifest(tmp, manifest)

    return atomic_write_dir(out_dir, write)


def write_ema_weights(ckpt_dir: Path, dest: Path) -> None:
    """The bundle's torch weights: only the checkpoint's EMA tensors (what every backend serves), half the size."""
    from safetensors.torch import save_file

    tensors = load_weights(ckpt_dir)
    ema = {k: v for k, v in tensors.items() if k.startswith("ema.")} or tensors
    save_file(ema, str(dest), metadata={"format": "quickstep-checkpoint"})


def build_manifest(model, cfg: dict[str, Any], *, kind: str, name: str, specs: Sequence[GraphSpec], opset: int,
                   precision: str, parity: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """manifest.json contents (docs/bundle.md) without the `files` table."""
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
    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "name": name, "kind": kind,
        "image_shape": list(model.sample_shape), "num_classes": int(model.num_classes),
        "class_names": class_names(cfg, model.num_classes), "class_aliases": dict(cfg.get("class_aliases") or {}),
        "steps_supported": keys, "default_steps": 1 if 1 in keys and kind == "consistency" else keys[0],
        "sigma_data": float(model.sigma_data), "times": times,
        "graphs": {s.key: {"onnx": s.filename, **s.io_dict()} for s in specs},
        "denoiser": {"onnx": den.filename, **den.io_dict()},
        "torch": {"weights": WEIGHTS, "config": CONFIG},
        "exporter": EXPORTER, "opset": int(opset), "precision": precision,
        "parity": parity,
        "export_seconds": timings,
        "files": {},
        "teacher": cfg.get("teacher"), "quality": cfg.get("quality", cfg.get("metrics")),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quickstep_version": _version(),
    }
    if sigmas:
        manifest["sigmas"] = sigmas
        manifest["nfe"] = {k: 2 * int(k) - 1 for k in sigmas}
    return manifest


def bundle_model(bundle: str | Path, device: str = "cpu"):
    """The TrigFlowModel of a bundle (its config.json + model.safetensors, EMA weights)."""
    try:
        return load_model(bundle, map_location=device)
    except CheckpointError as e:
        raise BundleError(f"cannot load the torch model of bundle {str(bundle)!r}: {e}") from e


def bundle_graph_specs(bundle: str | Path, manifest: dict[str, Any], model=None) -> list[GraphSpec]:
    """GraphSpecs (torch modules + I/O) for every generator graph in a bundle's manifest."""
    model = model if model is not None else bundle_model(bundle)
    keys = sorted(manifest.get("graphs", {}), key=int)
    if manifest.get("kind") == "consistency":
        times = manifest.get("times") or {}
        return [consistency_graph(model, int(k), ts=times.get(k)) for k in keys]
    return [heun_graph(model, int(k)) for k in keys]
