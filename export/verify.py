"""Bundle integrity: re-check every file's sha256 against manifest.json and (optionally) re-run the parity gates
(onnxruntime vs eager torch for every ONNX graph; AOTInductor packages vs eager where present)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from quickstep.artifacts import MANIFEST, BundleError, BundleManifest, ParityEntry, sha256_file

from .bundle import bundle_graph_specs, bundle_model, read_manifest
from .onnx import ParityError, denoiser_graph, onnx_parity


@dataclass
class VerifyReport:
    """What `verify_bundle` found: `ok` is True when there are no failures."""

    bundle: Path
    checked: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    parity: dict[str, dict[str, ParityEntry]] = field(default_factory=dict)  # backend -> graph key -> entry
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def raise_for_failures(self) -> VerifyReport:
        """Raise ParityError/BundleError naming every failure; return self when clean."""
        if self.failures:
            raise BundleError(f"bundle {str(self.bundle)!r} failed verification: " + "; ".join(self.failures))
        return self

    def summary(self) -> str:
        lines = [f"{'OK' if self.ok else 'FAILED'}: {self.bundle} ({len(self.checked)} files hashed)"]
        lines += [f"  FAIL {f}" for f in self.failures]
        for backend, graphs in self.parity.items():
            for key, e in graphs.items():
                lines.append(f"  parity {backend}[{key}]: {e.errors_text()} (tol {e.tolerance:g}) "
                             f"{'ok' if e.passed else 'FAIL'}")
        lines += [f"  skipped {s}" for s in self.skipped]
        return "\n".join(lines)


def check_hashes(bundle: Path, manifest: BundleManifest, report: VerifyReport) -> None:
    """Every listed file exists with its sha256 and size; no unlisted files; referenced files are listed."""
    files = manifest.files
    if not files:
        report.failures.append(f"{MANIFEST} lists no files")
    for rel, meta in files.items():
        p = bundle / rel
        if not p.is_file():
            report.failures.append(f"{rel}: listed in {MANIFEST} but missing")
            continue
        report.checked.append(rel)
        digest = sha256_file(p)
        if digest != meta.sha256:
            report.failures.append(f"{rel}: sha256 {digest[:16]}... does not match the manifest's "
                                   f"{meta.sha256[:16]}... (file modified or corrupt)")
        elif meta.bytes is not None and p.stat().st_size != meta.bytes:
            report.failures.append(f"{rel}: size {p.stat().st_size} != manifest {meta.bytes}")
    for p in sorted(bundle.rglob("*")):
        rel = p.relative_to(bundle).as_posix()
        if p.is_file() and p.name != MANIFEST and rel not in files and not p.name.startswith("."):
            report.failures.append(f"{rel}: present in the bundle but not listed in {MANIFEST}")
    for ref in manifest.referenced_files():
        if ref not in files:
            report.failures.append(f"{ref}: referenced by {MANIFEST} but not in its files table")


def check_parity(bundle: Path, manifest: BundleManifest, report: VerifyReport, batches: Sequence[int]) -> None:
    """Re-run onnxruntime (and AOTInductor, where present) against the bundle's own torch model."""
    model = bundle_model(bundle)
    specs = bundle_graph_specs(bundle, manifest, model)
    if manifest.denoiser is not None and manifest.denoiser.onnx:
        specs.append(denoiser_graph(model))
    ort_results: dict[str, ParityEntry] = {}
    for spec in specs:
        tol = manifest.parity_tolerance("onnxruntime", spec.key)
        entry = onnx_parity(spec, bundle / spec.filename, batches, num_classes=model.num_classes,
                            precision=manifest.precision, tol=tol)
        ort_results[spec.key] = entry
        if not entry.passed:
            report.failures.append(f"{spec.filename}: onnxruntime parity failed ({entry.summary()})")
    report.parity["onnxruntime"] = ort_results
    aoti_graphs = {k: g.aoti for k, g in manifest.graphs.items() if g.aoti}
    if aoti_graphs:
        from .aoti import aoti_parity

        device = manifest.aoti.device if manifest.aoti is not None and manifest.aoti.device else "cpu"
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                report.skipped.append("aoti parity (packages built for cuda; no GPU here)")
                return
        report.parity["aoti"] = {}
        for spec in bundle_graph_specs(bundle, manifest, bundle_model(bundle, device)):
            if spec.key not in aoti_graphs:
                continue
            entry = aoti_parity(spec, bundle / aoti_graphs[spec.key], batches, num_classes=model.num_classes,
                                device=device)
            report.parity["aoti"][spec.key] = entry
            if not entry.passed:
                report.failures.append(f"{aoti_graphs[spec.key]}: AOTInductor parity failed ({entry.summary()})")
    if any(g.tensorrt for g in manifest.graphs.values()):
        report.skipped.append("tensorrt parity (run `quickstep-export tensorrt` on the target GPU to re-check)")


def verify_bundle(path: str | Path, *, parity: bool = True, batches: Sequence[int] = (1, 7)) -> VerifyReport:
    """Check a bundle's hashes and (when `parity`) its graphs against torch; failures are in the report.

    Raises BundleError only when `path` is not a readable bundle at all."""
    bundle = Path(path)
    manifest = read_manifest(bundle)
    report = VerifyReport(bundle=bundle)
    check_hashes(bundle, manifest, report)
    if parity and report.ok:
        try:
            check_parity(bundle, manifest, report, batches)
        except (BundleError, ParityError) as e:
            report.failures.append(str(e))
    elif parity:
        report.skipped.append("parity (hash check failed first)")
    return report
