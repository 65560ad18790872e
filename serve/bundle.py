"""Bundle loading (docs/bundle.md): manifest.json parsing and sha256 verification of every listed file."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quickstep.artifacts import (
    MANIFEST,
    BundleError,
    BundleManifest,
    FileEntry,
    GraphEntry,
    Quality,
    QualityEntry,
    TensorSpec,
    TorchFiles,
    sha256_file,
)

from .device import Device

log = logging.getLogger("quickstep.serve")

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
GraphSpec = GraphEntry  # the generator graph for one step count: files per backend plus its I/O

__all__ = ["BUNDLED_DIR", "MANIFEST", "Bundle", "BundleError", "GraphSpec", "QualityGateError", "TensorSpec",
           "bundled_default", "check_quality_gate", "discover_bundles", "load_bundle", "quality_flags",
           "recorded_device", "verify_files"]


@dataclass(frozen=True)
class Bundle:
    """A verified bundle directory: its path and its typed manifest."""

    path: Path
    manifest: BundleManifest = field(repr=False)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.manifest.image_shape

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def steps_supported(self) -> tuple[int, ...]:
        return tuple(self.manifest.steps_supported)

    @property
    def default_steps(self) -> int:
        return self.manifest.default_steps

    @property
    def sigma_data(self) -> float:
        return self.manifest.sigma_data

    @property
    def times(self) -> dict[int, list[float]]:
        return self.manifest.times_by_steps

    @property
    def graphs(self) -> dict[int, GraphEntry]:
        return {int(k): g for k, g in self.manifest.graphs.items()}

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Index-aligned class names; None when the manifest names no classes."""
        return None if self.manifest.class_names is None else tuple(self.manifest.class_names)

    @property
    def class_aliases(self) -> dict[str, int]:
        """Extra prompt words -> class index."""
        return dict(self.manifest.class_aliases)

    @property
    def quality(self) -> Quality | None:
        return self.manifest.quality

    @property
    def torch_files(self) -> TorchFiles | None:
        return self.manifest.torch

    def file(self, rel: str) -> Path:
        """Absolute path of a bundle file; a BundleError when it is absent."""
        p = self.path / rel
        if not p.is_file():
            raise BundleError(f"bundle {self.name!r} ({self.path}) lacks {rel!r}")
        return p

    def graph_file(self, steps: int, key: str, what: str) -> Path:
        """The file of backend `key` for `steps`; a clear error naming what to export when it is missing."""
        g = self.graphs[steps]
        rel = self.manifest.graph_file(steps, key)
        if rel is None:
            raise BundleError(
                f"bundle {self.name!r} has no {what} for steps={steps} (manifest graphs[{str(steps)!r}] lacks "
                f"{key!r}; files available: {sorted(g.files) or 'none'}); re-export it with that backend")
        return self.file(rel)


def verify_files(path: Path, files: dict[str, FileEntry]) -> None:
    """Every file listed in the manifest exists with the recorded size and sha256, else BundleError."""
    problems = []
    for rel, meta in files.items():
        p = path / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            problems.append(f"{rel!r}: path escapes the bundle")
            continue
        if not p.is_file():
            problems.append(f"{rel!r}: missing")
            continue
        size = p.stat().st_size
        if meta.bytes is not None and meta.bytes != size:
            problems.append(f"{rel!r}: {size} bytes, manifest says {meta.bytes} (truncated or replaced)")
            continue
        digest = sha256_file(p)
        if digest != meta.sha256:
            problems.append(f"{rel!r}: sha256 {digest[:12]}... does not match the manifest's {meta.sha256[:12]}...")
    if problems:
        raise BundleError(f"bundle {path} is corrupt; refusing to load it: " + "; ".join(problems))


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Read and validate BUNDLE/manifest.json (docs/bundle.md); with `verify`, check every file's sha256."""
    path = Path(path).expanduser().resolve()
    manifest = BundleManifest.read(path)
    if verify:
        if not manifest.files:
            raise BundleError(f"{path / MANIFEST} lists no files with sha256; refusing an unverifiable bundle")
        verify_files(path, manifest.files)
    return Bundle(path=path, manifest=manifest)


class QualityGateError(BundleError):
    """The bundle's quality report flags the backend chosen to serve it (serve anyway with --force)."""


def quality_flags(bundle: Bundle, backend: str) -> list[tuple[str, QualityEntry]]:
    """(steps, entry) of manifest quality.backends[backend] marked `flagged` by `quickstep-export report` (with the
    `device` they were measured on, e.g. 'onnxruntime (CPUExecutionProvider)', when recorded)."""
    return [] if bundle.quality is None else bundle.quality.flags(backend)


def recorded_device(entry: QualityEntry) -> Device | None:
    """The device a quality entry was measured on (its display string parsed), None when not recorded."""
    if not entry.device:
        return None
    try:
        return Device.parse(str(entry.device))
    except ValueError:
        raise BundleError(f"quality entry device {entry.device!r} is not a device description "
                          "(expected e.g. 'onnxruntime (CPUExecutionProvider)' or 'torch (cpu)')") from None


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else "?"


def check_quality_gate(bundle: Bundle, backend: str, force: bool = False, device: Device | None = None) -> str | None:
    """Refuse (QualityGateError) a bundle whose quality report flags `backend`; with `force`, return the warning.

    `device` is what the backend will run on (Backend.planned_device(), e.g. onnxruntime on CUDAExecutionProvider).
    A flagged entry that records another device (measured on CPU, served on CUDA) does not refuse: it is logged
    as a note.  Entries without a device, or a gate without one, key on the backend name alone."""
    flags = quality_flags(bundle, backend)
    if device is not None:
        elsewhere = [(k, e) for k, e in flags if recorded_device(e) not in (None, device)]
        if elsewhere:
            log.warning("model %r: the quality report flags backend %r on %s (steps %s), not on %s as served "
                        "here; the flag does not apply - run `quickstep-export report` on this device to gate it",
                        bundle.name, backend, sorted({str(e.device) for _, e in elsewhere}),
                        [k for k, _ in elsewhere], device)
        flags = [f for f in flags if f not in elsewhere]
    if not flags:
        return None
    what = "; ".join(f"FD {_num(e.fd)} at steps={k} vs torch reference FD {_num(e.fd_torch)} "
                     f"(allowed difference {_num(e.fd_margin)})" + (f" on {e.device}" if e.device else "")
                     for k, e in flags)
    msg = (f"model {bundle.name!r}: the bundle's quality report flags backend {backend!r}: {what}. "
           f"Its samples do not match the torch reference")
    if force:
        return msg + "; serving it anyway because of --force"
    raise QualityGateError(msg + "; refusing to serve it. Re-export the bundle, pick another --backend, or pass "
                           "--force (QUICKSTEP_FORCE=1) to serve it anyway")


def discover_bundles(models_dir: str | Path) -> list[Path]:
    """Sub-directories of `models_dir` holding a manifest.json (sorted by name)."""
    d = Path(models_dir).expanduser()
    if not d.is_dir():
        raise BundleError(f"models directory {str(d)!r} does not exist or is not a directory")
    found = sorted(p for p in d.iterdir() if (p / MANIFEST).is_file())
    if not found:
        raise BundleError(f"models directory {str(d)!r} holds no bundle (no sub-directory with {MANIFEST})")
    return found


def bundled_default() -> Path:
    """The default model shipped inside the package (serve/bundled/<name>/)."""
    found = sorted(p for p in BUNDLED_DIR.glob("*") if (p / MANIFEST).is_file()) if BUNDLED_DIR.is_dir() else []
    if not found:
        raise BundleError(
            f"no bundle given and the bundled default model is not installed (expected a bundle under {BUNDLED_DIR}); "
            "pass --bundle DIR (a directory written by `quickstep-export bundle`) or --models-dir DIR, "
            "or set QUICKSTEP_BUNDLE")
    return found[0]
