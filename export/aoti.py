"""AOTInductor packages: torch.export with a dynamic batch Dim -> torch._inductor.aoti_compile_and_package ->
generator_{n}step.pt2 (one package serving every batch size in [1, max_batch]), checked against eager torch.

Load one with `torch._inductor.aoti_load_package(path)(noise[, noise2][, class_labels]) -> uint8 [B, H, W, C]`.
Compiling takes 40-60 s per graph on a 2-core CPU.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from quickstep.artifacts import AotiSection, ParityEntry

from .bundle import BundleError, bundle_graph_specs, bundle_model, read_manifest, refresh_files
from .onnx import EXAMPLE_BATCH, ExportError, ExportGraph, ParityError, example_inputs, parity_check

DEVICES = ("cpu", "cuda")


def check_device(device: str) -> str:
    """'cpu' or 'cuda' (the latter only when CUDA is available)."""
    if device not in DEVICES:
        raise ExportError(f"device must be one of {list(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda needs a CUDA GPU, and torch.cuda.is_available() is False here")
    return device


def _args(spec: ExportGraph, batch: int, num_classes: int, device: str) -> tuple[torch.Tensor, ...]:
    feeds = example_inputs(spec, batch, num_classes, seed=12345)
    return tuple(torch.from_numpy(feeds[s.name]).to(device) for s in spec.inputs)


def batch_dynamic_shapes(module: torch.nn.Module, args: tuple[torch.Tensor, ...], batch) -> dict[str, Any]:
    """dynamic_shapes for torch.export marking axis 0 of every argument, shaped like forward's signature
    (a `*rest` parameter gets a tuple of specs)."""
    bound = inspect.signature(module.forward).bind(*args)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        out[name] = tuple({0: batch} for _ in value) if isinstance(value, tuple) else {0: batch}
    return out


def compile_aoti(spec: ExportGraph, path: str | Path, *, num_classes: int, device: str = "cpu",
                 max_batch: int = 256) -> dict[str, float]:
    """torch.export `spec.module` with batch = Dim('batch', 1..max_batch) and package it to `path` (.pt2)."""
    from torch.export import Dim

    module = spec.module.to(device).eval()
    args = _args(spec, max(EXAMPLE_BATCH, 2), num_classes, device)  # example batch >= 2 so it stays symbolic
    batch = Dim("batch", min=1, max=max_batch)
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, args, dynamic_shapes=batch_dynamic_shapes(module, args, batch))
        t1 = time.perf_counter()
        torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
    t2 = time.perf_counter()
    return {"export_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3)}


def load_aoti(path: str | Path):
    """A callable for a .pt2 package."""
    return torch._inductor.aoti_load_package(str(path))


def aoti_parity(spec: ExportGraph, path: str | Path, batches: Sequence[int], *, num_classes: int,
                device: str = "cpu", tol: float | None = None) -> ParityEntry:
    """AOTInductor package vs eager torch at each batch size (uint8 levels)."""
    runner = load_aoti(path)

    def run(feeds):
        args = [torch.from_numpy(feeds[s.name]).to(device) for s in spec.inputs]
        with torch.no_grad():
            out = runner(*args)
        out = out[0] if isinstance(out, (list, tuple)) else out
        return out.cpu().numpy()

    spec.module.to(device)
    return parity_check(spec, run, batches, num_classes=num_classes, tol=tol, device=device)


def export_aoti_bundle(bundle: str | Path, *, device: str = "cpu", steps: Sequence[int] | None = None,
                       max_batch: int = 256, parity_batches: Sequence[int] = (1, 7)) -> dict[str, Any]:
    """Add generator_{n}step.pt2 (or generator_heun{n}.pt2) packages to a bundle and update its manifest.

    A package that fails parity is deleted and ParityError raised; the manifest only ever names checked files."""
    bundle = Path(bundle)
    check_device(device)
    manifest = read_manifest(bundle)
    model = bundle_model(bundle, device)
    specs = bundle_graph_specs(bundle, manifest, model)
    if steps is not None:
        wanted = {str(int(s)) for s in steps}
        unknown = sorted(wanted - {s.key for s in specs}, key=int)
        if unknown:
            raise ExportError(f"steps {unknown} are not in this bundle; it has {[s.key for s in specs]}")
        specs = [s for s in specs if s.key in wanted]
    results: dict[str, Any] = {}
    for spec in specs:
        filename = spec.filename.replace(".onnx", ".pt2")
        tmp = bundle / f".tmp-{filename}"  # must end in .pt2
        try:
            timing = compile_aoti(spec, tmp, num_classes=model.num_classes, device=device, max_batch=max_batch)
            entry = aoti_parity(spec, tmp, parity_batches, num_classes=model.num_classes, device=device)
            entry = entry.with_extra(**timing)
            if not entry.passed:
                raise ParityError(f"AOTInductor parity failed for {filename}: {entry.summary()}; package not added")
            tmp.replace(bundle / filename)
        finally:
            tmp.unlink(missing_ok=True)
        manifest.graphs[spec.key].aoti = filename
        manifest.parity.record("aoti", spec.key, entry)
        results[spec.key] = {"file": filename, **entry.to_json()}
    manifest.aoti = AotiSection(device=device, max_batch=int(max_batch), torch_version=torch.__version__)
    refresh_files(bundle, manifest)
    return results


__all__ = ["BundleError", "aoti_parity", "check_device", "compile_aoti", "export_aoti_bundle", "load_aoti"]
