"""quickstep-export: checkpoint -> bundle (ONNX), then TensorRT / AOTInductor artefacts, Triton repository, verify.

    quickstep-export onnx --ckpt runs/digits-scd --out bundles/digits-scd [--steps 1,2] [--opset 17] [--fp16]
    quickstep-export aoti --bundle bundles/digits-scd [--device cpu|cuda]
    quickstep-export tensorrt --bundle bundles/digits-scd [--batch 1,8,32]
    quickstep-export triton --bundle bundles/digits-scd --out triton-repo [--backend onnxruntime|tensorrt]
    quickstep-export verify bundles/digits-scd [--no-parity]
    quickstep-export report bundles/digits-scd --out reports/digits-scd [--backend onnxruntime --backend torch]
                     [--n 2000] [--steps 1,2] [--seed 0] [--write-manifest/--no-write-manifest]

Exit status: 0 success, 1 parity/verification failure or a backend flagged by `report`, 2 bad input or a missing dependency/GPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from quickstep.train.core.checkpoint import CheckpointError

from .bundle import BundleError
from .onnx import SUPPORTED_OPSETS, ExportError, ParityError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Export Quickstep checkpoints to bundles (ONNX, TensorRT, AOTInductor, Triton) and verify them.")


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _run(fn):
    """Call fn(); turn the package's errors into one-line messages and exit codes (never a traceback)."""
    try:
        return fn()
    except ParityError as e:
        raise _fail(str(e), 1) from None
    except (ExportError, BundleError, CheckpointError) as e:
        raise _fail(str(e), 2) from None


def _ints(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise _fail(f"{option} takes comma-separated integers such as 1,2; got {text!r}", 2) from None
    if not values:
        raise _fail(f"{option} is empty", 2)
    return values


@app.command()
def onnx(
    ckpt: Path = typer.Option(..., "--ckpt", help="checkpoint directory (model.safetensors + config.json)"),
    out: Path = typer.Option(..., "--out", help="bundle directory to write (replaced atomically)"),
    steps: str | None = typer.Option(None, help="consistency: step graphs, subset of 1,2 (default 1,2); "
                                                   "diffusion: Heun step counts (default 18)"),
    opset: int = typer.Option(17, help=f"ONNX opset, one of {list(SUPPORTED_OPSETS)}"),
    fp16: bool = typer.Option(False, "--fp16", help="fp16 convolutions/linear layers; normalisation, softmax and I/O stay fp32"),
    kind: str | None = typer.Option(None, help="consistency|diffusion (default: from the checkpoint config)"),
    name: str | None = typer.Option(None, help="model name (default: config name or directory name)"),
    parity_batches: str = typer.Option("1,7", help="batch sizes of the onnxruntime parity gate"),
) -> None:
    """Export a checkpoint to a bundle: whole-sampler ONNX graphs, denoiser.onnx, torch weights, manifest."""
    from .bundle import check_kind, export_bundle, read_manifest

    step_list = _ints(steps, "--steps")
    batches = _ints(parity_batches, "--parity-batches")

    def go():
        if not ckpt.exists():
            raise ExportError(f"checkpoint directory {str(ckpt)!r} does not exist")
        from quickstep.train.core.checkpoint import find_checkpoint, load_meta

        src = find_checkpoint(ckpt)  # a checkpoint, or a run directory's latest one
        k = check_kind(kind, load_meta(src))
        kwargs = {}
        if step_list is not None:
            kwargs["steps" if k == "consistency" else "heun_steps"] = step_list
        t0 = time.perf_counter()
        path = export_bundle(src, out, kind=k, opset=opset, fp16=fp16, name=name, parity_batches=batches,
                             **kwargs)
        return path, read_manifest(path), time.perf_counter() - t0

    path, m, seconds = _run(go)
    typer.echo(f"wrote {m.kind} bundle {m.name!r} to {path} in {seconds:.1f} s "
               f"(steps {m.steps_supported}, opset {m.opset}, {m.precision})")
    for key, e in (m.parity.onnxruntime or {}).items():
        typer.echo(f"  parity onnxruntime[{key}]: {e.errors_text()} {e.units} (tolerance {e.tolerance:g})")
    for f, meta in m.files.items():
        typer.echo(f"  {f}: {(meta.bytes or 0) / 1e6:.2f} MB")


@app.command()
def tensorrt(
    bundle: Path = typer.Option(..., "--bundle", help="bundle directory"),
    batch: str = typer.Option("1,8,32", help="batch buckets (one optimisation profile each)"),
    timing_cache: Path | None = typer.Option(None, help="timing cache file (default ~/.cache/quickstep/...)"),
    opt_level: int = typer.Option(3, help="builder optimisation level 0-5"),
) -> None:
    """Build TensorRT engines for this GPU from the bundle's ONNX graphs (needs the gpu extra and CUDA)."""
    from .tensorrt import export_tensorrt_bundle

    buckets = _ints(batch, "--batch")
    results = _run(lambda: export_tensorrt_bundle(bundle, batches=buckets, timing_cache=timing_cache,
                                                  opt_level=opt_level))
    typer.echo(json.dumps(results, indent=2))


@app.command()
def aoti(
    bundle: Path = typer.Option(..., "--bundle", help="bundle directory"),
    device: str = typer.Option("cpu", help="cpu|cuda"),
    steps: str | None = typer.Option(None, help="graphs to compile (default: all in the bundle)"),
    max_batch: int = typer.Option(256, help="largest batch the package accepts"),
) -> None:
    """Compile the bundle's generators with AOTInductor (torch.export, dynamic batch) into .pt2 packages."""
    from .aoti import export_aoti_bundle

    step_list = _ints(steps, "--steps")
    results = _run(lambda: export_aoti_bundle(bundle, device=device, steps=step_list, max_batch=max_batch))
    typer.echo(json.dumps(results, indent=2))


@app.command()
def triton(
    bundle: Path = typer.Option(..., "--bundle", help="bundle directory"),
    out: Path = typer.Option(..., "--out", help="model repository directory"),
    backend: str = typer.Option("onnxruntime", help="onnxruntime|tensorrt"),
    max_batch: int = typer.Option(32, help="max_batch_size of every model"),
    max_queue_delay_us: int = typer.Option(2000, help="dynamic batching window in microseconds"),
    instance_kind: str = typer.Option("auto", help="auto|cpu|gpu (auto: Triton's default placement)"),
    engine: str | None = typer.Option(None, help="TensorRT plan tag (<gpu>.trt<version>) when several exist"),
) -> None:
    """Write a Triton Inference Server model repository (serve it with `tritonserver --model-repository=OUT`)."""
    from .triton import write_triton_repository

    models = _run(lambda: write_triton_repository(bundle, out, backend=backend, max_batch=max_batch,
                                                  max_queue_delay_us=max_queue_delay_us,
                                                  instance_kind=instance_kind, engine=engine))
    for name, path in models.items():
        typer.echo(f"  {name}: {path}")
    typer.echo(f"serve with: tritonserver --model-repository={out}")


@app.command()
def verify(
    bundle: Path = typer.Argument(..., help="bundle directory"),
    parity: bool = typer.Option(True, "--parity/--no-parity", help="also re-run the parity checks"),
) -> None:
    """Re-check every file's sha256 (and parity); exit 1 on any failure."""
    from .verify import verify_bundle

    report = _run(lambda: verify_bundle(bundle, parity=parity))
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def report(
    bundle: Path = typer.Argument(..., help="bundle directory"),
    out: Path = typer.Option(..., "--out", help="directory for report.json, report.md, quality_vs_latency.png"),
    backend: list[str] = typer.Option(["onnxruntime", "torch"], "--backend",
                                      help="onnxruntime|tensorrt|aoti|torch (repeatable; torch always runs as the "
                                           "FD reference)"),
    n: int = typer.Option(2000, help="samples per backend x steps"),
    steps: str | None = typer.Option(None, help="step counts (default: the bundle's steps_supported)"),
    seed: int = typer.Option(0, help="request seed: image k uses numpy default_rng([seed, k]) as served"),
    latency_batches: str = typer.Option("1,8,64", help="batch sizes timed on each backend"),
    repeats: int = typer.Option(10, help="timed runs per batch size (median reported)"),
    spread_seeds: int = typer.Option(2, help="extra reseeded torch runs measuring the FD seed-to-seed spread"),
    relative_tolerance: float = typer.Option(0.02, help="flag when |FD - FD_torch| > max(this x FD_torch, "
                                                        "seed spread, --fd-floor)"),
    fd_floor: float = typer.Option(0.0, help="smallest FD margin"),
    device: str = typer.Option("cpu", help="cpu|cuda|auto (backends and the teacher)"),
    teacher: str | None = typer.Option(None, help="teacher checkpoint (default: the one the bundle names, if here)"),
    inception: str | None = typer.Option(None, help="Inception-v3 weights file for non-digits data"),
    write_manifest: bool = typer.Option(True, "--write-manifest/--no-write-manifest",
                                        help="store the numbers in manifest.json's quality section"),
) -> None:
    """Quality (FD, KID, precision/recall, class accuracy) and latency of every backend x steps, as served."""
    from .report import ReportConfig, make_report

    cfg = ReportConfig(backends=tuple(backend), steps=_ints(steps, "--steps"), n=n, seed=seed,
                       latency_batches=_ints(latency_batches, "--latency-batches") or (1, 8, 64), repeats=repeats,
                       spread_seeds=spread_seeds, relative_tolerance=relative_tolerance, fd_floor=fd_floor,
                       device=device, teacher=teacher, inception=inception, write_manifest=write_manifest)
    rep = _run(lambda: make_report(bundle, out, cfg, progress=lambda s: typer.echo(f"  {s}", err=True)))
    typer.echo((out / "report.md").read_text())
    typer.echo(f"wrote {out / 'report.json'}, {out / 'report.md'}"
               + (f", {rep['figures'][0]}" if rep["figures"] else "")
               + (f"; quality section written to {bundle / 'manifest.json'}" if write_manifest else ""))
    if rep["flagged"]:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
