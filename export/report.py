"""Quality and latency measured on what is served: `quickstep-export report BUNDLE`.

For every requested backend x step count the report draws samples *exactly as the server does* (the serve
backends themselves, `numpy.random.default_rng([seed, k])` noise from `quickstep.serve.service.draw_noise`,
the graph's own uint8 quantisation), then computes the evaluation metrics on them against the data set's
held-out split (FD and KID in a feature network, improved precision/recall, class accuracy for conditional
models) and times the same backend at batch 1/8/64 (median of repeats).  With a teacher checkpoint the
35-NFE Heun teacher (HeunGenerator of train.core, torch) is a row too.

Tolerance: a backend whose FD differs from the torch reference (same seed, same steps) by more than
margin = max(relative * FD_torch, seed-to-seed spread, floor) is flagged.  The spread is the range
(max - min) of the torch FD over `1 + spread_seeds` reseeded runs, measured by the report itself.  The
numbers go into manifest.json's `quality` section (manifest.json is not hashed, so the `files` table stays
valid); `quickstep-serve` refuses a flagged backend unless forced.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import read_manifest, write_manifest
from .onnx import ExportError

log = logging.getLogger("quickstep.export")

REPORT_VERSION = 1
BACKENDS = ("onnxruntime", "tensorrt", "aoti", "torch")
REFERENCE_BACKEND = "torch"
TEACHER_ROW = "teacher"


class ReportError(ExportError):
    """The report cannot be made (bad options, a backend that cannot load, no data set/feature network)."""


@dataclass(frozen=True)
class ReportConfig:
    """What `make_report` measures (CLI: `quickstep-export report --help`)."""

    backends: tuple[str, ...] = ("onnxruntime", "torch")
    steps: tuple[int, ...] | None = None  # default: the bundle's steps_supported
    n: int = 2000
    seed: int = 0
    gen_batch: int = 64  # images per backend call while sampling
    latency_batches: tuple[int, ...] = (1, 8, 64)
    repeats: int = 10  # timed runs per (backend, steps, batch); median reported
    latency_budget_s: float = 10.0  # stop repeating a batch size after this much time (>= 3 repeats)
    spread_seeds: int = 2  # extra reseeded torch runs that measure the FD seed-to-seed spread
    relative_tolerance: float = 0.02
    fd_floor: float = 0.0
    device: str = "cpu"
    teacher: str | None = None  # checkpoint dir; default: the manifest's/config's "teacher" when it exists
    teacher_steps: int = 18  # Heun steps: 2 * 18 - 1 = 35 NFE
    teacher_latency: bool = True
    inception: str | None = None  # Inception-v3 weights for non-digits image data
    write_manifest: bool = True
    plot: bool = True

    def check(self) -> ReportConfig:
        """Validate the options; ReportError naming the problem and the allowed values."""
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad or not self.backends:
            raise ReportError(f"--backend must be among {list(BACKENDS)}, got {list(self.backends)}")
        if self.n < 10:
            raise ReportError(f"--n must be at least 10 samples, got {self.n}")
        if self.steps is not None and (not self.steps or min(self.steps) < 1):
            raise ReportError(f"--steps must be positive integers, got {list(self.steps)}")
        if not self.latency_batches or min(self.latency_batches) < 1:
            raise ReportError(f"--latency-batches must be positive integers, got {list(self.latency_batches)}")
        if self.repeats < 1 or self.gen_batch < 1 or self.spread_seeds < 0:
            raise ReportError("--repeats and --gen-batch must be >= 1 and --spread-seeds >= 0")
        if not 0 <= self.relative_tolerance < 1 or self.fd_floor < 0:
            raise ReportError("--relative-tolerance must be in [0, 1) and --fd-floor >= 0")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ReportError(f"--device must be cpu, cuda or auto, got {self.device!r}")
        return self


# ----------------------------------------------------------------------------------------------- sampling
def serve_backend(bundle, name: str, cfg: ReportConfig):
    """A loaded serve backend for `bundle` (the very class `quickstep-serve --backend name` runs)."""
    from quickstep.serve.backends.base import BackendError, create_backend
    from quickstep.serve.bundle import BundleError as ServeBundleError
    from quickstep.serve.settings import ServeSettings

    try:
        settings = ServeSettings(backend=name, device=cfg.device, ui=False, bundle=[],
                                 max_batch=max(cfg.gen_batch, *cfg.latency_batches))
        backend = create_backend(bundle, settings)
        backend.preflight()
        backend.load()
    except (BackendError, ServeBundleError, ValueError) as e:
        raise ReportError(f"backend {name!r} cannot run bundle {bundle.name!r}: {e}") from e
    return backend


def balanced_labels(n: int, num_classes: int) -> np.ndarray | None:
    """Class labels [n] balanced over the classes (k mod C) for conditional models, else None."""
    return (np.arange(n, dtype=np.int64) % num_classes) if num_classes > 0 else None


def draw_inputs(bundle, steps: int, seed: int, n: int) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The server's inputs for n images of one request with `seed`: noise [n, C, H, W] per step + labels [n]."""
    from quickstep.serve.service import draw_noise

    g = bundle.graphs[steps]
    noises = draw_noise(seed, n, bundle.image_shape, len(g.noise_inputs))
    return noises, balanced_labels(n, bundle.num_classes) if g.has_labels else None


def sample(run: Callable[[list[np.ndarray], np.ndarray | None], np.ndarray], noises: list[np.ndarray],
           labels: np.ndarray | None, batch: int) -> np.ndarray:
    """Run the generator over the inputs in chunks of `batch` -> uint8 images [n, H, W, C]."""
    n = noises[0].shape[0]
    out = []
    for i in range(0, n, batch):
        out.append(run([x[i : i + batch] for x in noises], None if labels is None else labels[i : i + batch]))
    return np.concatenate(out)


def uint8_to_float(images: np.ndarray):
    """uint8 [N, H, W, C] -> float32 torch [N, C, H, W] in [-1, 1] (the inverse of to_uint8_nhwc's grid)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def time_batches(run: Callable[[list[np.ndarray], np.ndarray | None], np.ndarray], bundle, steps: int,
                 cfg: ReportConfig, repeats: int | None = None) -> dict[str, dict[str, float]]:
    """{batch: {latency_ms (median), throughput_img_s, repeats}} after one warm-up run per batch size."""
    out: dict[str, dict[str, float]] = {}
    for b in cfg.latency_batches:
        noises, labels = draw_inputs(bundle, steps, cfg.seed, b)
        run(noises, labels)  # warm-up: allocations, lazy initialisation
        times: list[float] = []
        t_start = time.perf_counter()
        want = repeats or cfg.repeats
        while len(times) < want and (len(times) < min(3, want) or time.perf_counter() - t_start < cfg.latency_budget_s):
            t0 = time.perf_counter()
            run(noises, labels)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        out[str(b)] = {"latency_ms": med * 1e3, "throughput_img_s": b / med, "repeats": len(times)}
    return out


# ----------------------------------------------------------------------------------------------- data and metrics
@dataclass
class Evaluator:
    """Reference features of the held-out split and the feature/classifier functions of its data set."""

    data: str
    reference_size: int
    feature_net: str
    features: Callable[[Any], Any]
    ref_features: Any
    classify: Callable[[Any], Any] | None = None

    def quality(self, images: np.ndarray, labels: np.ndarray | None, seed: int) -> dict[str, float]:
        """FD, KID (mean, std), precision/recall (k=3) and class accuracy of uint8 images [N, H, W, C]."""
        import torch
        from quickstep.train.eval.metrics import frechet_distance, kid, precision_recall

        f = self.features(uint8_to_float(images))
        m = min(500, len(f), len(self.ref_features))
        k_mean, k_std = kid(f, self.ref_features, subsets=20, subset_size=m,
                            generator=torch.Generator().manual_seed(seed),
                            normalize=not self.feature_net.startswith("Inception"))
        prec, rec = precision_recall(self.ref_features, f, k=3)
        q = {"fd": frechet_distance(f, self.ref_features), "kid": k_mean, "kid_std": k_std,
             "precision": prec, "recall": rec}
        if self.classify is not None and labels is not None:
            pred = self.classify(uint8_to_float(images))
            q["class_accuracy"] = float((pred == torch.from_numpy(labels)).float().mean())
        return q


def data_section(config: dict[str, Any]) -> dict[str, Any]:
    """The loader arguments of the bundle's data set: config['train']['data'], else config['data'] by name."""
    from quickstep.train.data import DATASETS

    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    d = train.get("data") if isinstance(train.get("data"), dict) else None
    if d and d.get("name") in DATASETS:
        return {"name": d["name"], "path": d.get("path"), "resolution": d.get("resolution"),
                "options": dict(d.get("options") or {}), "seed": int(train.get("seed", 0))}
    d = config.get("data") if isinstance(config.get("data"), dict) else None
    if d and d.get("name") in DATASETS:
        shape = d.get("shape") or []
        return {"name": d["name"], "path": d.get("path"), "resolution": int(shape[-1]) if len(shape) == 3 else None,
                "options": {}, "seed": 0}
    named = (d or {}).get("name")
    raise ReportError(f"the bundle's config.json names no known data set (train.data / data: {named!r}); "
                      f"the report needs one of {list(DATASETS)} to compare against")


def make_evaluator(config: dict[str, Any], image_shape: tuple[int, int, int], num_classes: int,
                   inception: str | None, device: str) -> Evaluator:
    """Held-out split (test) of the bundle's data set and the feature network: the digits classifier for
    digits data (images resized to its 16x16 input when needed), Inception-v3 from a local file otherwise."""
    import torch.nn.functional as F
    from quickstep.train.data import load_dataset

    d = data_section(config)
    try:
        test = load_dataset(d["name"], path=d["path"], split="test", seed=d["seed"], resolution=d["resolution"],
                            **d["options"])
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise ReportError(f"cannot load the held-out split of data set {d['name']!r}: {e}") from e
    if test.spec.kind != "image" or tuple(test.spec.shape) != tuple(image_shape):
        raise ReportError(f"data set {d['name']!r} has samples of shape {list(test.spec.shape)}, the bundle makes "
                          f"{list(image_shape)}; cannot compare them")
    if d["name"] == "digits":
        from quickstep.train.eval import classifier

        def to16(x):
            return x if tuple(x.shape[-2:]) == (16, 16) else F.interpolate(x, size=(16, 16), mode="bilinear",
                                                                          align_corners=False)

        def feats(x):
            return classifier.features(to16(x))

        def cls(x):
            return classifier.classify(to16(x))

        return Evaluator(data=f"digits test split ({len(test)} images)", reference_size=len(test),
                         feature_net="quickstep digits classifier (fc1, 128-d)", features=feats,
                         ref_features=feats(test.x), classify=cls if num_classes == 10 else None)
    if inception is None:
        raise ReportError(f"no feature network for data set {d['name']!r}: pass --inception PATH "
                          "(local Inception-v3 weights, see quickstep.train.eval.inception)")
    from quickstep.train.eval.inception import inception_features, load_inception

    net = load_inception(inception, device=device)

    def ifeats(x):
        return inception_features(net, x.to(device)).cpu()

    return Evaluator(data=f"{d['name']} test split ({len(test)} images)", reference_size=len(test),
                     feature_net="Inception-v3 pool3 (2048-d)", features=ifeats, ref_features=ifeats(test.x))


# ----------------------------------------------------------------------------------------------- teacher
def find_teacher(bundle_path: Path, manifest: dict[str, Any], config: dict[str, Any],
                 explicit: str | None) -> Path | None:
    """The teacher checkpoint directory: `explicit`, else manifest/config 'teacher' (a path or {'path': ...}),
    resolved against the bundle and the working directory (a training run directory means its latest checkpoint);
    None when none is named or it is not here."""
    from quickstep.train.core.checkpoint import CheckpointError, find_checkpoint

    candidates = [explicit] if explicit else [manifest.get("teacher"), config.get("teacher"),
                                               (config.get("train") or {}).get("teacher")
                                               if isinstance(config.get("train"), dict) else None]
    for c in candidates:
        if isinstance(c, dict):
            c = c.get("path") or c.get("checkpoint")
        if not isinstance(c, str) or not c:
            continue
        for p in (Path(c).expanduser(), bundle_path / c):
            if p.is_dir():
                try:  # a checkpoint, or a run directory's latest checkpoint
                    p = find_checkpoint(p)
                except CheckpointError:
                    continue
            if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
                return p.resolve()
        if explicit:
            raise ReportError(f"--teacher {explicit!r} is not a checkpoint directory (config.json + model.safetensors) "
                              "nor a training run directory holding one")
        log.warning("teacher %r named by the bundle is not available here; no teacher row", c)
    return None


# ----------------------------------------------------------------------------------------------- tolerance
def fd_margin(fd_torch: float, spread: float, cfg: ReportConfig) -> float:
    """max(relative * FD_torch, seed-to-seed spread, floor)."""
    return max(cfg.relative_tolerance * fd_torch, spread, cfg.fd_floor)


def apply_tolerance(rows: list[dict[str, Any]], spread: dict[str, float], cfg: ReportConfig) -> list[dict[str, Any]]:
    """Mark every backend row with fd_torch, margin and `flagged`; return the flagged rows."""
    ref = {r["steps"]: r["fd"] for r in rows if r["backend"] == REFERENCE_BACKEND}
    flagged = []
    for r in rows:
        if r["backend"] == TEACHER_ROW or r["steps"] not in ref:
            continue
        margin = fd_margin(ref[r["steps"]], spread.get(str(r["steps"]), 0.0), cfg)
        r["fd_torch"] = ref[r["steps"]]
        r["fd_margin"] = margin
        r["flagged"] = bool(abs(r["fd"] - ref[r["steps"]]) > margin)
        if r["flagged"]:
            flagged.append(r)
    return flagged


def quality_section(report: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `quality` section: per backend and steps the metrics, latency and the flag."""
    backends: dict[str, dict[str, Any]] = {}
    for r in report["rows"]:
        if r["backend"] == TEACHER_ROW:
            continue
        entry = {k: r[k] for k in ("fd", "kid", "precision", "recall", "class_accuracy", "fd_torch", "fd_margin",
                                   "flagged", "nfe") if k in r}
        entry["latency_ms"] = {b: v["latency_ms"] for b, v in r["latency"].items()}
        entry["throughput_img_s"] = {b: v["throughput_img_s"] for b, v in r["latency"].items()}
        entry["device"] = r["device"]
        backends.setdefault(r["backend"], {})[str(r["steps"])] = entry
    teacher = next((r for r in report["rows"] if r["backend"] == TEACHER_ROW), None)
    return {
        "report_version": REPORT_VERSION, "created": report["created"], "n": report["n"], "seed": report["seed"],
        "data": report["data"], "feature_net": report["feature_net"], "hardware": report["hardware"],
        "reference_backend": REFERENCE_BACKEND, "tolerance": report["tolerance"], "backends": backends,
        "teacher": None if teacher is None else {k: teacher[k] for k in ("fd", "kid", "precision", "recall",
                                                                         "class_accuracy", "nfe", "checkpoint")
                                                 if k in teacher},
        "flagged": [{"backend": r["backend"], "steps": r["steps"], "fd": r["fd"], "fd_torch": r["fd_torch"],
                     "fd_margin": r["fd_margin"]} for r in report["flagged"]],
    }


# ----------------------------------------------------------------------------------------------- outputs
def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool):
        return "**yes**" if v else "no"
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.{digits}g}"
    return "-" if v is None else str(v)


def write_markdown(report: dict[str, Any], path: Path) -> Path:
    """report.md: one row per backend x steps (+ teacher), latency at each batch, the tolerance used."""
    batches = [str(b) for b in report["config"]["latency_batches"]]
    cond = any("class_accuracy" in r for r in report["rows"])
    cols = ["backend", "device", "steps", "NFE", "FD", "KID", "precision", "recall"] + (["class acc"] if cond else [])
    cols += [f"ms @b{b}" for b in batches] + [f"img/s @b{batches[-1]}", "FD torch", "margin", "flagged"]
    lines = [f"# Quality and latency of bundle `{report['bundle_name']}`", "",
             f"- samples per row: {report['n']} (seed {report['seed']}, noise `default_rng([seed, k])` as served), "
             f"reference: {report['data']}, features: {report['feature_net']}",
             f"- hardware: {report['hardware']}; report took {report['seconds']:.1f} s",
             f"- tolerance: flagged when |FD - FD_torch| > max({report['tolerance']['relative']:g} x FD_torch, "
             f"seed spread, floor {report['tolerance']['floor']:g}); seed spread (range of torch FD over "
             f"{report['tolerance']['spread_runs']} seeds): "
             + ", ".join(f"{k} step(s) {_fmt(v)}" for k, v in report["tolerance"]["seed_spread"].items()), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["rows"]:
        lat = r.get("latency") or {}
        cells = [r["backend"], r["device"], r["steps"], r["nfe"], _fmt(r["fd"]), _fmt(r["kid"], 3),
                 _fmt(r["precision"], 3), _fmt(r["recall"], 3)] + ([_fmt(r.get("class_accuracy"), 3)] if cond else [])
        cells += [_fmt(lat[b]["latency_ms"], 3) if b in lat else "-" for b in batches]
        cells += [_fmt(lat[batches[-1]]["throughput_img_s"], 4) if batches[-1] in lat else "-",
                  _fmt(r.get("fd_torch")), _fmt(r.get("fd_margin"), 3), _fmt(r.get("flagged"))]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    for r in report["flagged"]:
        lines.append(f"**FLAGGED**: {r['backend']} at {r['steps']} step(s): FD {r['fd']:.4g} vs torch "
                     f"{r['fd_torch']:.4g} (margin {r['fd_margin']:.3g}); `quickstep-serve --backend {r['backend']}` "
                     "refuses this bundle unless `--force`.")
    if report.get("figures"):
        lines += ["", *[f"![{Path(f).stem}]({Path(f).name})" for f in report["figures"]]]
    if report.get("notes"):
        lines += ["", *[f"- {n}" for n in report["notes"]]]
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_quality_vs_latency(report: dict[str, Any], path: Path) -> Path:
    """FD against batch-1 latency (log x), one marker per backend x steps row (matplotlib, Agg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the quality-vs-latency plot needs matplotlib: pip install 'quickstep[train]'") from e
    b = str(report["config"]["latency_batches"][0])
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for r in report["rows"]:
        lat = (r.get("latency") or {}).get(b)
        if lat is None:
            continue
        marker = "x" if r.get("flagged") else ("s" if r["backend"] == TEACHER_ROW else "o")
        ax.scatter([lat["latency_ms"]], [r["fd"]], marker=marker, s=40)
        ax.annotate(f"{r['backend']} {r['nfe']} NFE", (lat["latency_ms"], r["fd"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"latency at batch {b} (ms, median)")
    ax.set_ylabel("FD (lower is better)")
    ax.set_title(f"{report['bundle_name']}: quality vs latency", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def hardware() -> str:
    """One line describing the machine."""
    import os

    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {dev}"


# ----------------------------------------------------------------------------------------------- entry point
@dataclass
class _Row:
    backend: str
    device: str
    steps: int
    nfe: int
    quality: dict[str, float]
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds_generate: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "device": self.device, "steps": self.steps, "nfe": self.nfe,
                **self.quality, "latency": self.latency, "seconds_generate": self.seconds_generate, **self.extra}


def _load_bundle(path: Path):
    from quickstep.serve.bundle import BundleError as ServeBundleError
    from quickstep.serve.bundle import load_bundle

    try:
        return load_bundle(path, verify=True)
    except ServeBundleError as e:
        raise ReportError(str(e)) from e


def make_report(bundle_dir: str | Path, out: str | Path, cfg: ReportConfig = ReportConfig(),
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every backend x steps of a bundle; write report.json, report.md, quality_vs_latency.png into
    `out` and (cfg.write_manifest) the manifest's `quality` section.  Returns the report dict."""
    from quickstep.train.core.checkpoint import load_config

    cfg.check()
    say = progress or (lambda s: None)
    t_start = time.perf_counter()
    bundle_dir = Path(bundle_dir)
    bundle = _load_bundle(bundle_dir)
    steps = tuple(cfg.steps) if cfg.steps else tuple(bundle.steps_supported)
    missing = [s for s in steps if s not in bundle.steps_supported]
    if missing:
        raise ReportError(f"--steps {list(missing)} not in the bundle's steps_supported {list(bundle.steps_supported)}")
    config = load_config(bundle.path)
    ev = make_evaluator(config, bundle.image_shape, bundle.num_classes, cfg.inception, cfg.device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    backends = list(dict.fromkeys([REFERENCE_BACKEND, *cfg.backends]))  # the torch reference always runs first
    if REFERENCE_BACKEND not in cfg.backends:
        notes.append("torch was added as the reference backend of the FD tolerance")

    def nfe(s: int) -> int:
        return s if bundle.kind == "consistency" else 2 * s - 1

    rows: list[_Row] = []
    spread: dict[str, float] = {}
    spread_fds: dict[str, list[float]] = {}
    for name in backends:
        say(f"loading {name}")
        backend = serve_backend(bundle, name, cfg)
        try:
            for s in steps:
                def run(noises, labels, s=s, backend=backend):
                    return backend.run(s, noises, labels)

                say(f"{name}: {s} step(s), sampling {cfg.n}")
                noises, labels = draw_inputs(bundle, s, cfg.seed, cfg.n)
                t0 = time.perf_counter()
                images = sample(run, noises, labels, cfg.gen_batch)
                gen_s = time.perf_counter() - t0
                q = ev.quality(images, labels, cfg.seed)
                if name == REFERENCE_BACKEND:
                    fds = [q["fd"]]
                    for j in range(1, cfg.spread_seeds + 1):
                        say(f"torch: {s} step(s), reseeded run {j}/{cfg.spread_seeds}")
                        nz, lb = draw_inputs(bundle, s, cfg.seed + j, cfg.n)
                        fds.append(ev.quality(sample(run, nz, lb, cfg.gen_batch), lb, cfg.seed + j)["fd"])
                    spread_fds[str(s)] = fds
                    spread[str(s)] = max(fds) - min(fds)
                say(f"{name}: {s} step(s), timing batches {list(cfg.latency_batches)}")
                lat = time_batches(run, bundle, s, cfg)
                rows.append(_Row(name, backend.describe(), s, nfe(s), q, lat, gen_s))
        finally:
            backend.close()

    teacher_dir = find_teacher(bundle.path, bundle.manifest, config, cfg.teacher)
    if teacher_dir is not None:
        rows.append(_teacher_row(teacher_dir, bundle, ev, cfg, say))
    elif bundle.manifest.get("teacher") or config.get("teacher"):
        notes.append(f"teacher {bundle.manifest.get('teacher') or config.get('teacher')!r} not found locally: "
                     "no teacher row")

    report: dict[str, Any] = {
        "bundle": str(bundle.path), "bundle_name": bundle.name, "kind": bundle.kind,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "n": cfg.n, "seed": cfg.seed, "data": ev.data, "feature_net": ev.feature_net, "hardware": hardware(),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "rows": [r.to_dict() for r in rows], "figures": [], "notes": notes,
        "tolerance": {"relative": cfg.relative_tolerance, "floor": cfg.fd_floor, "seed_spread": spread,
                      "spread_runs": 1 + cfg.spread_seeds, "torch_fd_by_seed": spread_fds,
                      "rule": "flagged when |FD - FD_torch| > max(relative * FD_torch, seed_spread, floor)"},
    }
    report["flagged"] = apply_tolerance(report["rows"], spread, cfg)
    if cfg.plot:
        try:
            report["figures"].append(str(plot_quality_vs_latency(report, out / "quality_vs_latency.png")))
        except ImportError as e:
            notes.append(f"plot skipped: {e}")
    report["seconds"] = time.perf_counter() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    write_markdown(report, out / "report.md")
    if cfg.write_manifest:
        write_quality(bundle_dir, quality_section(report))
    return report


def _teacher_row(teacher_dir: Path, bundle, ev: Evaluator, cfg: ReportConfig, say) -> _Row:
    """The teacher through train.core's HeunGenerator (torch eager) at 2 * teacher_steps - 1 NFE."""
    import torch
    from quickstep.train.core.checkpoint import CheckpointError, load_model
    from quickstep.train.core.generator import HeunGenerator

    try:
        model = load_model(teacher_dir, map_location="cpu" if cfg.device != "cuda" else "cuda")
    except CheckpointError as e:
        raise ReportError(f"teacher {str(teacher_dir)!r} cannot be loaded: {e}") from e
    if tuple(model.sample_shape) != tuple(bundle.image_shape) or model.num_classes != bundle.num_classes:
        raise ReportError(f"teacher {str(teacher_dir)!r} makes {list(model.sample_shape)} with {model.num_classes} "
                          f"classes; the bundle makes {list(bundle.image_shape)} with {bundle.num_classes}")
    dev = next(model.parameters()).device
    gen = HeunGenerator(model.eval(), num_steps=cfg.teacher_steps).eval()

    def run(noises, labels):
        args = [torch.from_numpy(noises[0]).to(dev)]
        if labels is not None:
            args.append(torch.from_numpy(labels).to(dev))
        with torch.inference_mode():
            return gen(*args).cpu().numpy()

    from quickstep.serve.service import draw_noise

    nfe = 2 * cfg.teacher_steps - 1
    say(f"teacher: Heun {cfg.teacher_steps} steps ({nfe} NFE), sampling {cfg.n}")
    noises = draw_noise(cfg.seed, cfg.n, bundle.image_shape, 1)
    labels = balanced_labels(cfg.n, bundle.num_classes)
    t0 = time.perf_counter()
    images = sample(run, noises, labels, cfg.gen_batch)
    gen_s = time.perf_counter() - t0
    q = ev.quality(images, labels, cfg.seed)
    lat: dict[str, dict[str, float]] = {}
    if cfg.teacher_latency:
        say("teacher: timing")
        tb = _TeacherBundle(bundle)
        lat = time_batches(run, tb, 0, cfg, repeats=max(1, min(cfg.repeats, 3)))
    return _Row(TEACHER_ROW, f"torch ({dev})", cfg.teacher_steps, nfe, q, lat, gen_s,
                extra={"checkpoint": str(teacher_dir), "sampler": f"Heun {cfg.teacher_steps} steps (EDM Alg. 2)"})


class _TeacherBundle:
    """Enough of a Bundle for `draw_inputs` to draw one noise tensor (and labels) for the teacher."""

    def __init__(self, bundle) -> None:
        from types import SimpleNamespace

        self.image_shape = bundle.image_shape
        self.num_classes = bundle.num_classes
        self.graphs = {0: SimpleNamespace(noise_inputs=("noise",), has_labels=bundle.num_classes > 0)}


def write_quality(bundle_dir: str | Path, quality: dict[str, Any]) -> Path:
    """Set manifest.json's `quality` section (atomic write).  manifest.json is not in the hashed `files` table,
    so the other files' sha256 stay valid; the table is re-checked first so a tampered bundle is not blessed."""
    bundle_dir = Path(bundle_dir)
    _load_bundle(bundle_dir)  # verifies every listed file's sha256
    manifest = read_manifest(bundle_dir)
    manifest["quality"] = quality
    return write_manifest(bundle_dir, manifest)


__all__ = ["ReportConfig", "ReportError", "apply_tolerance", "fd_margin", "make_report", "quality_section",
           "write_quality"]
