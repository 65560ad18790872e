"""`quickstep-train eval`: the evaluation sub-command, picked up by `quickstep.train.cli` through `register`.

    quickstep-train eval --ckpt DIR [--steps 1,2] [--n 1000] --out DIR [--teacher DIR] [--inception PATH]
                         [--nll-n N] [--seed S] [--device cpu|cuda] [--no-progress] [--sweep-t-mid [--record-times]]
"""

from __future__ import annotations

import json

import typer


def parse_steps(text: str | None) -> tuple[int, ...] | None:
    """'1,2' -> (1, 2); a clear error naming the allowed form otherwise."""
    if text is None or text.strip() == "":
        return None
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--steps must be a comma-separated list of positive integers (e.g. 1,2), got {text!r}") from None
    if any(s < 1 for s in steps):
        raise ValueError(f"--steps must be positive integers (e.g. 1,2), got {text!r}")
    return steps


def eval_command(
    ckpt: str = typer.Option(..., "--ckpt", help="checkpoint or run directory (its latest checkpoint)"),
    steps: str | None = typer.Option(None, "--steps", help="comma-separated step counts: consistency steps for "
                                     "students (default 1,2), Heun steps for teachers (default 2,4,9,18)"),
    n: int = typer.Option(1000, "--n", help="samples per setting (default 1000)"),
    out: str = typer.Option(..., "--out", help="output directory"),
    teacher: str | None = typer.Option(None, "--teacher", help="teacher checkpoint for the student's ODE error"),
    inception: str | None = typer.Option(None, "--inception", help="local FID Inception-v3 weights (.safetensors or "
                                         ".pt/.pth state dict) for image data other than digits"),
    nll_n: int | None = typer.Option(None, "--nll-n", help="test samples for the PF-ODE likelihood of teachers (0 "
                                     "skips; default 500 vectors, 32 images)"),
    diagnostics_n: int = typer.Option(512, "--diag-n", help="noisy samples per sigma band for the exact GMM "
                                      "diagnostics (default 512)"),
    sweep_t_mid: bool = typer.Option(False, "--sweep-t-mid", help="students: sweep the 2-step intermediate time "
                                     "against the data and sample 2 steps at the best"),
    record_times: bool = typer.Option(False, "--record-times", help="with --sweep-t-mid: write the chosen sampler "
                                      "times into the checkpoint's config.json (export and the server then use them)"),
    seed: int = typer.Option(0, "--seed"),
    weights: str = typer.Option("ema", "--weights", help="ema (default: what export and serving use) or raw (the "
                                "training weights, e.g. at the end of an lr anneal)"),
    device: str = typer.Option("cpu", "--device"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
) -> None:
    """Run `evaluate_checkpoint`; print where the report went and the headline numbers."""
    from .report import evaluate_checkpoint

    if n < 4:
        raise ValueError(f"--n must be >= 4, got {n}")
    if diagnostics_n < 8:
        raise ValueError(f"--diag-n must be >= 8, got {diagnostics_n}")
    report = evaluate_checkpoint(ckpt, steps=parse_steps(steps), n=n, out=out, teacher=teacher, inception=inception,
                                 nll_n=nll_n, diagnostics_n=diagnostics_n, seed=seed, device=device,
                                 progress=not no_progress, sweep_t_mid=sweep_t_mid, record_times=record_times,
                                 weights=weights)
    for row in report["quality"]:
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}))
    for w in report.get("warnings", []):
        typer.secho(f"warning: {w}", fg="yellow", err=True)
    print(f"wrote {out}/report.json, report.md and {len(report['figures'])} figures in {report['seconds']:.1f} s")


def register(app: typer.Typer) -> None:
    """Add the `eval` sub-command to quickstep-train's typer app."""
    app.command("eval", help="evaluate a checkpoint: report.json, report.md and plots")(eval_command)
