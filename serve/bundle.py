"""Bundle loading (docs/bundle.md): manifest.json parsing and sha256 verification of every listed file."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .device import Device

log = logging.getLogger("quickstep.serve")

MANIFEST = "manifest.json"
FORMAT = "quickstep-bundle"
SUPPORTED_FORMAT_VERSIONS = (1,)
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"


class BundleError(ValueError):
    """A bundle is missing, malformed or corrupt (the message says which file and why)."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input/output: name, dtype and shape (strings for dynamic axes)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class GraphSpec:
    """The generator graph for one step count: files per backend plus its I/O."""

    steps: int
    files: dict[str, str]  # backend key ('onnx', 'aoti', 'tensorrt', ...) -> file name in the bundle
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def noise_inputs(self) -> tuple[str, ...]:
        """Names of the standard-normal inputs, in draw order (noise, noise2, ...)."""
        return tuple(i.name for i in self.inputs if i.name.startswith("noise"))

    @property
    def has_labels(self) -> bool:
        return any(i.name == "class_labels" for i in self.inputs)


@dataclass(frozen=True)
class Bundle:
    """A verified bundle directory."""

    path: Path
    name: str
    kind: str
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    steps_supported: tuple[int, ...]
    default_steps: int
    sigma_data: float
    times: dict[int, list[float]]
    graphs: dict[int, GraphSpec]
    manifest: dict[str, Any] = field(repr=False)
    class_names: tuple[str, ...] | None = None  # index-aligned; None when the manifest names no classes
    class_aliases: dict[str, int] = field(default_factory=dict)  # extra prompt words -> class index

    @property
    def quality(self) -> dict[str, Any] | None:
        q = self.manifest.get("quality")
        return q if isinstance(q, dict) else None

    @property
    def torch_files(self) -> dict[str, str] | None:
        t = self.manifest.get("torch")
        return t if isinstance(t, dict) else None

    def file(self, rel: str) -> Path:
        """Absolute path of a bundle file; a BundleError when it is absent."""
        p = self.path / rel
        if not p.is_file():
            raise BundleError(f"bundle {self.name!r} ({self.path}) lacks {rel!r}")
        return p

    def graph_file(self, steps: int, key: str, what: str) -> Path:
        """The file of backend `key` for `steps`; a clear error naming what to export when it is missing."""
        g = self.graphs[steps]
        rel = g.files.get(key)
        if rel is None:
            raise BundleError(
                f"bundle {self.name!r} has no {what} for steps={steps} (manifest graphs[{str(steps)!r}] lacks "
                f"{key!r}; files available: {sorted(g.files) or 'none'}); re-export it with that backend")
        return self.file(rel)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Streaming sha256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def verify_files(path: Path, files: dict[str, Any]) -> None:
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
        if not isinstance(meta, dict) or "sha256" not in meta:
            problems.append(f"{rel!r}: manifest entry has no sha256")
            continue
        size = p.stat().st_size
        if "bytes" in meta and int(meta["bytes"]) != size:
            problems.append(f"{rel!r}: {size} bytes, manifest says {meta['bytes']} (truncated or replaced)")
            continue
        digest = sha256_file(p)
        if digest != meta["sha256"]:
            problems.append(f"{rel!r}: sha256 {digest[:12]}... does not match the manifest's {str(meta['sha256'])[:12]}...")
    if problems:
        raise BundleError(f"bundle {path} is corrupt; refusing to load it: " + "; ".join(problems))


def _specs(items: Any, where: str) -> tuple[TensorSpec, ...]:
    out = []
    for it in items or []:
        if isinstance(it, dict) and "name" in it:
            out.append(TensorSpec(str(it["name"]), str(it.get("dtype", "float32")), tuple(it.get("shape", ()))))
        else:
            raise BundleError(f"{where}: every input/output needs a 'name' (got {it!r})")
    return tuple(out)


def _req(m: dict[str, Any], key: str, path: Path) -> Any:
    if key not in m:
        raise BundleError(f"{path / MANIFEST} lacks the required key {key!r}")
    return m[key]


def _class_names(m: dict[str, Any], num_classes: int, mf: Path) -> tuple[tuple[str, ...] | None, dict[str, int]]:
    """manifest class_names (list[str] | null, one per class) and class_aliases ({word: class index})."""
    names = m.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(x, str) and x.strip() for x in names):
            raise BundleError(f"{mf}: class_names must be a list of non-empty strings or null")
        if len(names) != num_classes:
            raise BundleError(f"{mf}: class_names has {len(names)} names for num_classes {num_classes}")
    aliases = m.get("class_aliases") or {}
    if not isinstance(aliases, dict) or not all(
            isinstance(k, str) and k.strip() and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < num_classes
            for k, v in aliases.items()):
        raise BundleError(f"{mf}: class_aliases must map non-empty words to class indices 0..{num_classes - 1}")
    return (tuple(names) if names is not None else None), {str(k): int(v) for k, v in aliases.items()}


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Read and validate BUNDLE/manifest.json (docs/bundle.md); with `verify`, check every file's sha256."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise BundleError(f"bundle directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise BundleError(f"{str(path)!r} is a file; a bundle is a directory with {MANIFEST}")
    mf = path / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{str(path)!r} has no {MANIFEST}; is it a bundle written by `quickstep-export`?")
    try:
        m = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf} is not valid JSON ({e}); the bundle is damaged") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"{mf} is not a quickstep bundle manifest (format must be {FORMAT!r})")
    if m.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise BundleError(f"{mf}: format_version {m.get('format_version')!r} is not supported "
                          f"(this server reads {list(SUPPORTED_FORMAT_VERSIONS)})")
    try:
        kind = str(_req(m, "kind", path))
        if kind not in ("consistency", "diffusion"):
            raise BundleError(f"{mf}: kind must be 'consistency' or 'diffusion', got {kind!r}")
        shape = tuple(int(s) for s in _req(m, "image_shape", path))
        if len(shape) != 3:
            raise BundleError(f"{mf}: image_shape must be [C, H, W], got {list(shape)}")
        graphs: dict[int, GraphSpec] = {}
        for k, g in dict(_req(m, "graphs", path)).items():
            steps = int(k)
            files = {str(b): str(f) for b, f in g.items() if b not in ("inputs", "outputs") and isinstance(f, str)}
            graphs[steps] = GraphSpec(steps, files, _specs(g.get("inputs"), f"{mf} graphs[{k!r}]"),
                                      _specs(g.get("outputs"), f"{mf} graphs[{k!r}]"))
        steps_supported = tuple(sorted(int(s) for s in m.get("steps_supported", sorted(graphs))))
        missing = [s for s in steps_supported if s not in graphs]
        if missing or not steps_supported:
            raise BundleError(f"{mf}: steps_supported {list(steps_supported)} without graphs for {missing or 'any'}")
        default_steps = int(m.get("default_steps", steps_supported[0]))
        if default_steps not in steps_supported:
            raise BundleError(f"{mf}: default_steps {default_steps} is not in steps_supported {list(steps_supported)}")
        times = {int(k): [float(t) for t in v] for k, v in (m.get("times") or {}).items()}
        for s, g in graphs.items():
            if not g.noise_inputs:
                raise BundleError(f"{mf}: graph for steps={s} has no 'noise' input")
        num_classes = int(m.get("num_classes", 0) or 0)
        class_names, class_aliases = _class_names(m, num_classes, mf)
        bundle = Bundle(
            path=path, name=str(m.get("name") or path.name), kind=kind, image_shape=shape,  # type: ignore[arg-type]
            num_classes=num_classes, steps_supported=steps_supported,
            default_steps=default_steps, sigma_data=float(m.get("sigma_data", 0.5)), times=times,
            graphs=graphs, manifest=m, class_names=class_names, class_aliases=class_aliases,
        )
    except BundleError:
        raise
    except (TypeError, ValueError, AttributeError) as e:
        raise BundleError(f"{mf} is malformed: {e}") from e
    if verify:
        files = m.get("files")
        if not isinstance(files, dict) or not files:
            raise BundleError(f"{mf} lists no files with sha256; refusing an unverifiable bundle")
        verify_files(path, files)
    return bundle


class QualityGateError(BundleError):
    """The bundle's quality report flags the backend chosen to serve it (serve anyway with --force)."""


def quality_flags(bundle: Bundle, backend: str) -> list[dict[str, Any]]:
    """Entries of manifest quality.backends[backend] marked `flagged` by `quickstep-export report`, with steps
    (and the `device` they were measured on, e.g. 'onnxruntime (CPUExecutionProvider)', when recorded)."""
    q = bundle.quality or {}
    per_steps = (q.get("backends") or {}).get(backend) or {}
    if not isinstance(per_steps, dict):
        return []
    return [{"steps": k, **e} for k, e in sorted(per_steps.items()) if isinstance(e, dict) and e.get("flagged")]


def recorded_device(entry: dict[str, Any]) -> Device | None:
    """The device a quality entry was measured on (its display string parsed), None when not recorded."""
    text = entry.get("device")
    if not text:
        return None
    try:
        return Device.parse(str(text))
    except ValueError:
        raise BundleError(f"quality entry device {text!r} is not a device description "
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
        elsewhere = [f for f in flags if recorded_device(f) not in (None, device)]
        if elsewhere:
            log.warning("model %r: the quality report flags backend %r on %s (steps %s), not on %s as served "
                        "here; the flag does not apply - run `quickstep-export report` on this device to gate it",
                        bundle.name, backend, sorted({str(f["device"]) for f in elsewhere}),
                        [f["steps"] for f in elsewhere], device)
        flags = [f for f in flags if f not in elsewhere]
    if not flags:
        return None
    what = "; ".join(f"FD {_num(f.get('fd'))} at steps={f['steps']} vs torch reference FD {_num(f.get('fd_torch'))} "
                     f"(allowed difference {_num(f.get('fd_margin'))})"
                     + (f" on {f['device']}" if f.get("device") else "") for f in flags)
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
