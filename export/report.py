"""Quality and latency measured on what is served: `quickstep-export report BUNDLE`.

An adapter of the one evaluation pipeline (`quickstep.train.eval.pipeline`) around each served generator: for
every requested backend x step count the report draws samples *exactly as the server does* (the serve backends
themselves, opened through the contract's `open_runner` - export does not import serve -, noise
`quickstep.artifacts.draw_noise`, the graph's own uint8 quantisation), computes the pipeline's metrics against
the data set's held-out split and times the same backend at batch 1/8/64 (median of repeats).  With a teacher
checkpoint the 35-NFE Heun teacher (train.core's generator module, torch) is a row too.

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
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from quickstep.train.eval.pipeline import (
    EvalDataError,
    Evaluator,
    chunks,
    evaluator_for,
    fmt,
    hardware,
    load_split,
    plot_quality_vs_latency,
)
from quickstep.train.eval.pipeline import sample as pipeline_sample

from quickstep.artifacts import (
    ArtifactError,
    BundleManifest,
    CheckpointMeta,
    Quality,
    Runner,
    TeacherRef,
    balanced_labels,
    draw_noise,
    nfe,
    open_runner,
    relative_ref,
    sha256_file,
)

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
def serve_backend(bundle_dir: str | Path, name: str, cfg: ReportConfig) -> Runner:
    """A loaded serve backend for the bundle (the very class `quickstep-serve --backend name` runs), opened through
    the runner registry of the artefact contract."""
    try:
        return open_runner(bundle_dir, name, device=cfg.device, max_batch=max(cfg.gen_batch, *cfg.latency_batches))
    except (ArtifactError, RuntimeError, ValueError) as e:
        raise ReportError(f"backend {name!r} cannot run bundle {str(bundle_dir)!r}: {e}") from e


def draw_inputs(manifest: BundleManifest, steps: int, seed: int, n: int) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The server's inputs for n images of one request with `seed`: noise [n, C, H, W] per step + labels [n]
    (balanced over the classes, k mod C, instead of the server's random draw)."""
    g = manifest.graph(steps)
    noises = draw_noise(seed, n, manifest.image_shape, len(g.noise_inputs))
    return noises, balanced_labels(n, manifest.num_classes) if g.has_labels else None


def run_chunks(run: Callable[[list[np.ndarray], np.ndarray | None], np.ndarray], noises: list[np.ndarray],
               labels: np.ndarray | None, batch: int) -> np.ndarray:
    """Run the generator over the inputs in chunks of `batch` -> uint8 images [n, H, W, C]."""
    return pipeline_sample(run, chunks(noises, labels, batch))[0]


def time_batches(run: Callable[[list[np.ndarray], np.ndarray | None], np.ndarray],
                 inputs: Callable[[int], tuple[list[np.ndarray], np.ndarray | None]],
                 cfg: ReportConfig, repeats: int | None = None) -> dict[str, dict[str, float]]:
    """{batch: {latency_ms (median), throughput_img_s, repeats}} after one warm-up run per batch size;
    `inputs(b)` gives the generator's inputs for a batch of b."""
    out: dict[str, dict[str, float]] = {}
    for b in cfg.latency_batches:
        noises, labels = inputs(b)
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
def make_evaluator(meta: CheckpointMeta, image_shape: tuple[int, ...], num_classes: int, inception: str | None,
                   device: str) -> Evaluator:
    """The pipeline's evaluator on the held-out (test) split of the bundle's data set: the digits classifier for
    digits data, Inception-v3 from a local file otherwise."""
    try:
        test = load_split(meta, "test")
    except EvalDataError as e:
        raise ReportError(str(e)) from e
    if test.spec.kind != "image" or tuple(test.spec.shape) != tuple(image_shape):
        raise ReportError(f"data set {test.spec.name!r} has samples of shape {list(test.spec.shape)}, the bundle "
                          f"makes {list(image_shape)}; cannot compare them")
    ev = evaluator_for(test, split="test", num_classes=num_classes, inception=inception, device=device)
    if ev is None:
        raise ReportError(f"no feature network for data set {test.spec.name!r}: pass --inception PATH "
                          "(local Inception-v3 weights, see quickstep.train.eval.inception)")
    return ev


def measure(ev: Evaluator, images: np.ndarray, labels: np.ndarray | None, seed: int) -> dict[str, float]:
    """The pipeline's quality of uint8 images (KID subsets drawn from a generator seeded `seed`)."""
    import torch

    return ev.quality(images, labels, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- teacher
def find_teacher(bundle_path: Path, recorded: TeacherRef | None, explicit: str | None) -> Path | None:
    """The teacher checkpoint directory: `explicit`, else the reference the bundle records, resolved against the
    working directory and the bundle (a training run directory means its latest checkpoint) and checked against its
    sha256; None when none is named or it is not here."""
    from quickstep.train.core.checkpoint import CheckpointError, find_checkpoint

    candidates = [explicit] if explicit else [recorded.ref if recorded is not None else None]
    for c in candidates:
        if not c:
            continue
        for p in (Path(c).expanduser(), bundle_path / c):
            if p.is_dir():
                try:  # a checkpoint, or a run directory's latest checkpoint
                    p = find_checkpoint(p)
                except CheckpointError:
                    continue
            if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
                if not explicit and recorded is not None and sha256_file(p / "model.safetensors") != recorded.sha256:
                    log.warning("teacher %r differs from the one the bundle records (sha256); no teacher row", c)
                    return None
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
             + ", ".join(f"{k} step(s) {fmt(v)}" for k, v in report["tolerance"]["seed_spread"].items()), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["rows"]:
        lat = r.get("latency") or {}
        cells = [r["backend"], r["device"], r["steps"], r["nfe"], fmt(r["fd"]), fmt(r["kid"], 3),
                 fmt(r["precision"], 3), fmt(r["recall"], 3)] + ([fmt(r.get("class_accuracy"), 3)] if cond else [])
        cells += [fmt(lat[b]["latency_ms"], 3) if b in lat else "-" for b in batches]
        cells += [fmt(lat[batches[-1]]["throughput_img_s"], 4) if batches[-1] in lat else "-",
                  fmt(r.get("fd_torch")), fmt(r.get("fd_margin"), 3), fmt(r.get("flagged"))]
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


def _load_bundle(path: Path) -> BundleManifest:
    """The bundle's manifest after checking every listed file's sha256 (ReportError naming what is wrong)."""
    from .verify import VerifyReport, check_hashes

    try:
        manifest = read_manifest(path)
    except ArtifactError as e:
        raise ReportError(str(e)) from e
    checked = VerifyReport(Path(path))
    check_hashes(Path(path), manifest, checked)
    if not checked.ok:
        raise ReportError(f"bundle {path} is corrupt; refusing to report on it: " + "; ".join(checked.failures))
    return manifest


def make_report(bundle_dir: str | Path, out: str | Path, cfg: ReportConfig = ReportConfig(),
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every backend x steps of a bundle; write report.json, report.md, quality_vs_latency.png into
    `out` and (cfg.write_manifest) the manifest's `quality` section.  Returns the report dict."""
    from quickstep.train.core.checkpoint import load_meta

    cfg.check()
    say = progress or (lambda s: None)
    t_start = time.perf_counter()
    bundle_dir = Path(bundle_dir).expanduser().resolve()
    manifest = _load_bundle(bundle_dir)
    steps = tuple(cfg.steps) if cfg.steps else tuple(manifest.steps_supported)
    missing = [s for s in steps if s not in manifest.steps_supported]
    if missing:
        raise ReportError(f"--steps {list(missing)} not in the bundle's steps_supported {manifest.steps_supported}")
    meta = load_meta(bundle_dir)
    ev = make_evaluator(meta, manifest.image_shape, manifest.num_classes, cfg.inception, cfg.device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    backends = list(dict.fromkeys([REFERENCE_BACKEND, *cfg.backends]))  # the torch reference always runs first
    if REFERENCE_BACKEND not in cfg.backends:
        notes.append("torch was added as the reference backend of the FD tolerance")

    rows: list[_Row] = []
    spread: dict[str, float] = {}
    spread_fds: dict[str, list[float]] = {}
    for name in backends:
        say(f"loading {name}")
        backend = serve_backend(bundle_dir, name, cfg)
        try:
            for s in steps:
                def run(noises, labels, s=s, backend=backend):
                    return backend.run(s, noises, labels)

                say(f"{name}: {s} step(s), sampling {cfg.n}")
                noises, labels = draw_inputs(manifest, s, cfg.seed, cfg.n)
                t0 = time.perf_counter()
                images = run_chunks(run, noises, labels, cfg.gen_batch)
                gen_s = time.perf_counter() - t0
                q = measure(ev, images, labels, cfg.seed)
                if name == REFERENCE_BACKEND:
                    fds = [q["fd"]]
                    for j in range(1, cfg.spread_seeds + 1):
                        say(f"torch: {s} step(s), reseeded run {j}/{cfg.spread_seeds}")
                        nz, lb = draw_inputs(manifest, s, cfg.seed + j, cfg.n)
                        fds.append(measure(ev, run_chunks(run, nz, lb, cfg.gen_batch), lb, cfg.seed + j)["fd"])
                    spread_fds[str(s)] = fds
                    spread[str(s)] = max(fds) - min(fds)
                say(f"{name}: {s} step(s), timing batches {list(cfg.latency_batches)}")
                lat = time_batches(run, lambda b, s=s: draw_inputs(manifest, s, cfg.seed, b), cfg)
                rows.append(_Row(name, backend.describe(), s, nfe(manifest.kind, s), q, lat, gen_s))
        finally:
            backend.close()

    rec = manifest.teacher or meta.teacher
    teacher_dir = find_teacher(bundle_dir, rec, cfg.teacher)
    if teacher_dir is not None:
        rows.append(_teacher_row(teacher_dir, manifest, ev, cfg, say))
    elif rec is not None:
        notes.append(f"teacher {rec.ref or rec.sha256[:12]!r} not found locally: no teacher row")

    report: dict[str, Any] = {
        "bundle": str(bundle_dir), "bundle_name": manifest.name, "kind": manifest.kind,
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
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
            report["figures"].append(str(plot_quality_vs_latency(
                report["rows"], str(cfg.latency_batches[0]), out / "quality_vs_latency.png",
                f"{manifest.name}: quality vs latency", teacher_row=TEACHER_ROW)))
        except ImportError as e:
            notes.append(f"plot skipped: {e}")
    report["seconds"] = time.perf_counter() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    write_markdown(report, out / "report.md")
    if cfg.write_manifest:
        write_quality(bundle_dir, quality_section(report))
    return report


def _teacher_row(teacher_dir: Path, manifest: BundleManifest, ev: Evaluator, cfg: ReportConfig, say) -> _Row:
    """The teacher through train.core's Heun generator module (torch eager, uint8 like a served graph) at
    2 * teacher_steps - 1 NFE."""
    import torch
    from quickstep.train.core.checkpoint import CheckpointError, load_model
    from quickstep.train.core.generator import generator_module

    try:
        model = load_model(teacher_dir, map_location="cpu" if cfg.device != "cuda" else "cuda")
    except CheckpointError as e:
        raise ReportError(f"teacher {str(teacher_dir)!r} cannot be loaded: {e}") from e
    if tuple(model.sample_shape) != tuple(manifest.image_shape) or model.num_classes != manifest.num_classes:
        raise ReportError(f"teacher {str(teacher_dir)!r} makes {list(model.sample_shape)} with {model.num_classes} "
                          f"classes; the bundle makes {list(manifest.image_shape)} with {manifest.num_classes}")
    dev = next(model.parameters()).device
    gen = generator_module(model.eval(), "diffusion", cfg.teacher_steps).eval()

    def run(noises, labels):
        args = [torch.from_numpy(noises[0]).to(dev)]
        if labels is not None:
            args.append(torch.from_numpy(labels).to(dev))
        with torch.inference_mode():
            return gen(*args).cpu().numpy()

    def inputs(n: int) -> tuple[list[np.ndarray], np.ndarray | None]:
        return draw_noise(cfg.seed, n, manifest.image_shape, 1), balanced_labels(n, manifest.num_classes)

    teacher_nfe = nfe("diffusion", cfg.teacher_steps)
    say(f"teacher: Heun {cfg.teacher_steps} steps ({teacher_nfe} NFE), sampling {cfg.n}")
    noises, labels = inputs(cfg.n)
    t0 = time.perf_counter()
    images = run_chunks(run, noises, labels, cfg.gen_batch)
    gen_s = time.perf_counter() - t0
    q = measure(ev, images, labels, cfg.seed)
    lat: dict[str, dict[str, float]] = {}
    if cfg.teacher_latency:
        say("teacher: timing")
        lat = time_batches(run, inputs, cfg, repeats=max(1, min(cfg.repeats, 3)))
    return _Row(TEACHER_ROW, f"torch ({dev})", cfg.teacher_steps, teacher_nfe, q, lat, gen_s,
                extra={"checkpoint": relative_ref(teacher_dir), "sampler": f"Heun {cfg.teacher_steps} steps (EDM Alg. 2)"})


def write_quality(bundle_dir: str | Path, quality: dict[str, Any]) -> Path:
    """Set manifest.json's `quality` section (atomic write).  manifest.json is not in the hashed `files` table,
    so the other files' sha256 stay valid; the table is re-checked first so a tampered bundle is not blessed."""
    bundle_dir = Path(bundle_dir)
    manifest = _load_bundle(bundle_dir)  # verifies every listed file's sha256
    manifest.quality = Quality.model_validate(quality)
    return write_manifest(bundle_dir, manifest)


__all__ = ["ReportConfig", "ReportError", "apply_tolerance", "fd_margin", "make_report", "quality_section",
           "write_quality"]
