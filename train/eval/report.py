"""Evaluation reports: `evaluate_checkpoint(ckpt, steps=..., n=..., out=...)` samples a checkpoint at several
step counts and writes report.json, report.md and matplotlib PNGs (quality vs NFE, per-sigma score error,
sample grids).  Every quality number sits next to its NFE and wall time per image.

What is measured depends on the checkpoint and its data set (read from the checkpoint's config.json):
- kind: a consistency student (objectives sct/scd/direct_cm/cd) is sampled with the sCM 1-/2-/multi-step
  sampler (NFE = steps); a diffusion teacher with deterministic Heun (NFE = 2 steps - 1; default 18 -> 35).
- gmm data (analytic mixture): log-likelihood of the samples under the true density, sliced W1/W2 and MMD^2; for
  teachers the exact per-sigma diagnostics (score error, score-FPE residual, CP violation), the NLL of test
  data via the PF-ODE, and STF-vs-DSM target variance; for students the ODE error against the exact PF-ODE
  (and against `teacher` when given) and the exact consistency-map error per sigma band.
- digits: FD, KID and precision/recall in the shipped classifier's features against the digits train split,
  class accuracy of class-conditional samples; for teachers bits/dim on test images (Hutchinson); for
  students the ODE error against `teacher` when given.
- other image data: FD/KID/precision/recall in Inception-v3 features when `inception=PATH` is given.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quickstep.artifacts import nfe

from ..core import checkpoint as ckpt_io
from ..core.sampling import generate as core_generate
from .pipeline import (
    ImagesFn,
    dataset_args,
    evaluator_for,
    fmt,
    hardware,
    load_split,
    markdown_table,
    plot_per_sigma,
    plot_quality_vs_nfe,
    plot_samples,
    sample,
)

DEFAULT_STUDENT_STEPS = (1, 2)
DEFAULT_TEACHER_STEPS = (2, 4, 9, 18)
# radians; sigma 0.025 .. 1.8 at sigma_d 0.5.  0.05-0.15 since the sixth session: on ring8 only t_mid 0.15-0.2 make 2
# steps no worse than 1 in log-likelihood as well as in sliced W1 (docs/students.md)
T_MID_GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)


@dataclass(frozen=True)
class SampleRun:
    """Samples of one sampler setting with their cost."""

    sampler: str  # "consistency" | "heun"
    steps: int
    nfe: int
    samples: torch.Tensor  # [n, ...] on the CPU
    labels: torch.Tensor | None
    seconds_per_image: float


def _find(path: str | Path) -> Path:
    """A checkpoint directory, or the latest checkpoint of a run directory (the trainer's rule)."""
    from ..loop import find_checkpoint

    return find_checkpoint(path)


def model_images(model, sampler: str, steps: int, device: torch.device | str = "cpu",
                 ts: Sequence[float] | None = None) -> ImagesFn:
    """images(noises, labels) of a checkpoint in torch: noises = [eps, eps2, ...] standard normal (one per
    consistency step; Heun takes eps only) -> float samples in the data range."""
    if sampler not in ("consistency", "heun"):
        raise ValueError(f"sampler must be 'consistency' or 'heun', got {sampler!r}")

    def images(noises: list[torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            return core_generate(model, sampler, noises[0].to(device), steps, ts=ts,
                                 extra_noise=[n.to(device) for n in noises[1:]],
                                 class_labels=None if labels is None else labels.to(device))

    return images


def generate(model, sampler: str, steps: int, n: int, *, seed: int = 0, batch_size: int = 500,
             device: torch.device | str = "cpu", ts: Sequence[float] | None = None) -> SampleRun:
    """n samples from `model` with the consistency (NFE = steps; times `ts`, default the core's) or Heun (NFE =
    2 steps - 1) sampler; the noise of each batch is drawn from one torch generator seeded `seed` (eps, then the
    later steps' noise)."""
    if steps < 1 or n < 1:
        raise ValueError(f"steps and n must be >= 1, got steps={steps}, n={n}")
    images = model_images(model, sampler, steps, device, ts=ts)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % model.num_classes if model.num_classes > 0 else None
    extra_steps = steps - 1 if sampler == "consistency" else 0

    def inputs():
        for i in range(0, n, batch_size):
            b = min(batch_size, n - i)
            noises = [torch.randn((b, *model.sample_shape), generator=g) for _ in range(1 + extra_steps)]
            yield noises, None if labels is None else labels[i : i + b]

    samples, seconds = sample(images, inputs())
    return SampleRun(sampler, steps, nfe(kind_of_sampler(sampler), steps), samples, labels, seconds / n)


def kind_of_sampler(sampler: str) -> str:
    return "consistency" if sampler == "consistency" else "diffusion"


def _row(run: SampleRun, quality: dict[str, Any]) -> dict[str, Any]:
    return {"sampler": run.sampler, "steps": run.steps, "nfe": run.nfe, "seconds_per_image": run.seconds_per_image,
            **quality}


def t_mid_sweep(model, score_fn, *, n: int, seed: int, grid: Sequence[float] = T_MID_GRID,
                device: torch.device | str = "cpu", guard_fn=None, guard_name: str = "") -> dict[str, Any]:
    """The 2-step sampler's intermediate time as a property of the model: 2-step samples at every t_mid of `grid`
    (same noise), scored by `score_fn(SampleRun) -> float` (lower is better), on noise seed `seed` (use a
    different seed for the reported numbers), beside the 1-step sampler on the same noise.  A `guard_fn` (a second
    score, lower is better: minus the exact log-likelihood on mixtures) restricts the choice to the t_mid whose 2 steps
    are no worse than 1 step in both scores, when there is one (issue 17: two steps must not be worse than one).
    Returns {'grid', 'scores', 'chosen', 'times': [t_max, chosen], 'one_step_score', 'two_step_gain'} (gain = 1-step
    score minus the chosen 2-step score: negative means a second step makes this student worse), with a guard also
    {'guard', 'guard_scores', 'one_step_guard', 'no_worse' (the t_mid no worse in both)}."""
    from ..core.trigflow import t_max

    tm = t_max(sigma_data=model.sigma_data)
    one_run = generate(model, "consistency", 1, n, seed=seed, device=device, ts=[tm])
    one, scores, guards = float(score_fn(one_run)), [], []
    one_guard = float(guard_fn(one_run)) if guard_fn is not None else None
    for t in grid:
        run = generate(model, "consistency", 2, n, seed=seed, device=device, ts=[tm, float(t)])
        scores.append(float(score_fn(run)))
        if guard_fn is not None:
            guards.append(float(guard_fn(run)))
    candidates = list(range(len(grid)))
    extra: dict[str, Any] = {}
    if guard_fn is not None:
        ok = [i for i in candidates if scores[i] <= one and guards[i] <= one_guard]
        extra = {"guard": guard_name, "guard_scores": guards, "one_step_guard": one_guard,
                 "no_worse": [float(grid[i]) for i in ok]}
        candidates = ok or candidates
    best = min(candidates, key=lambda i: scores[i])
    return {"grid": [float(t) for t in grid], "scores": scores, "chosen": float(grid[best]),
            "times": [tm, float(grid[best])], "n": n, "seed": seed, "one_step_score": one,
            "two_step_gain": one - scores[best], **extra}


def two_step_warning(sweep: dict[str, Any], metric: str) -> str | None:
    """The eval report's warning when no swept t_mid beats one step (issue 17: two steps must not be worse than one),
    in the score or, when the sweep had a guard, in either score."""
    i = sweep["grid"].index(sweep["chosen"])
    chosen = sweep["scores"][i]
    where = f"noise seed {sweep['seed']}, n {sweep['n']}"
    if sweep["two_step_gain"] < 0:
        return (f"2 steps are worse than 1 at every swept t_mid: the best, t_mid {sweep['chosen']}, scores {metric} "
                f"{chosen:.5g} against 1 step's {sweep['one_step_score']:.5g} ({where}); serve this student with "
                f"steps=1")
    if "guard" in sweep and not sweep["no_worse"]:
        g = sweep["guard_scores"][i]
        return (f"no swept t_mid makes 2 steps as good as 1 in both {metric} and {sweep['guard']}: the chosen t_mid "
                f"{sweep['chosen']} gains {sweep['two_step_gain']:.5g} in {metric} but scores {sweep['guard']} "
                f"{g:.5g} against 1 step's {sweep['one_step_guard']:.5g} ({where}); serve this student with steps=1 "
                f"where {sweep['guard']} matters more")
    return None


# ----------------------------------------------------------------------------------------------- markdown
def write_markdown(report: dict[str, Any], path: Path) -> Path:
    """report.md: the sample-quality table (with NFE and s/img), the diagnostics and the figures."""
    lines = [f"# Evaluation of `{report['checkpoint']}`", "",
             f"- kind: **{report['kind']}**, data: `{report['data']}`, samples per setting: {report['n']}, "
             f"seed {report['seed']}, {report.get('weights', 'ema')} weights",
             f"- hardware: {report['hardware']}; total wall time {report['seconds']:.1f} s", ""]
    rows = report["quality"]
    if rows:
        cols = ["sampler", "steps", "nfe", "seconds_per_image"] + [
            k for k in rows[0] if k not in ("sampler", "steps", "nfe", "seconds_per_image")]
        lines += ["## Sample quality (per sampler setting)", "", markdown_table(rows, cols), ""]
    if report.get("reference"):
        lines += ["Reference floor (true data against true data, same metric): "
                  + ", ".join(f"{k} = {fmt(v)}" for k, v in report["reference"].items()), ""]
    for key, title in (("nll", "Likelihood (PF-ODE)"), ("ode_error", "ODE error (1-step student vs Heun PF-ODE)")):
        if report.get(key):
            items = report[key] if isinstance(report[key], list) else [report[key]]
            lines += [f"## {title}", "", markdown_table(items, list(items[0])), ""]
    if report.get("map_error"):
        lines += ["## Exact consistency-map error E||f(x_t, t) - Phi*(x_t, t)||^2 per sigma band", "",
                  markdown_table(report["map_error"], list(report["map_error"][0])), ""]
    if report.get("t_mid_sweep"):
        sw = report["t_mid_sweep"]
        rows = [{"t_mid": t, "score": v} for t, v in zip(sw["grid"], sw["scores"], strict=True)]
        for row, g in zip(rows, sw.get("guard_scores", []), strict=False):  # a guarded sweep: its second score too
            row["guard"] = g
        lines += [f"2-step t_mid sweep (noise seed {sw['seed']}, n {sw['n']}): chosen {sw['chosen']}, 1-step score "
                  f"{fmt(sw['one_step_score'])}, gain of the second step {fmt(sw['two_step_gain'])}"
                  + (f"; chosen among the t_mid no worse than 1 step in {sw['guard']} too "
                     f"({fmt(sw['one_step_guard'])} at 1 step): {sw['no_worse'] or 'none'}" if "guard" in sw else ""), "",
                  markdown_table(rows, list(rows[0])), ""]
    for w in report.get("warnings", []):
        lines += [f"**Warning:** {w}", ""]
    if report.get("times"):
        lines += ["Consistency sampler times: " + ", ".join(f"{k} step(s): {[round(t, 4) for t in v]}"
                                                            for k, v in report["times"].items()), ""]
    if report.get("diagnostics"):
        lines += ["## Exact per-sigma diagnostics (Gaussian mixture)", ""]
        for name, vals in report["diagnostics"].items():
            lines += [f"### {name}", "", markdown_table(vals, list(vals[0])), ""]
    if report.get("stf_target_variance"):
        vals = report["stf_target_variance"]
        lines += ["## STF vs DSM target error around the exact posterior mean (per coordinate)", "",
                  markdown_table(vals, list(vals[0])), ""]
    if report.get("figures"):
        lines += ["## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in report["figures"]] + [""]
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------------------------- entry point
def evaluate_checkpoint(
    ckpt: str | Path,
    *,
    steps: Sequence[int] | None = None,
    n: int = 1000,
    out: str | Path,
    teacher: str | Path | None = None,
    inception: str | Path | None = None,
    nll_n: int | None = None,
    diagnostics_n: int = 512,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    sweep_t_mid: bool = False,
    record_times: bool = False,
    weights: str = "ema",
) -> dict[str, Any]:
    """Evaluate a checkpoint (or run directory: its latest checkpoint) and write report.json, report.md and
    PNG figures into `out`.  `steps`: consistency steps for students (default 1, 2), Heun steps for teachers
    (default 2, 4, 9, 18 = 3..35 NFE).  Students sample at the times their checkpoint records (else the core
    defaults); `sweep_t_mid` first sweeps the 2-step intermediate time against the data (sliced W1 on mixtures,
    FD on images; noise seed `seed` + 7, reported numbers on `seed`) and samples 2 steps at the best one;
    `record_times` writes the chosen times into the checkpoint's config.json (export and serving then use them).
    `weights`: the checkpoint's 'ema' weights (default; what export and serving use) or its 'raw' training weights.
    Returns the report dict."""
    from tqdm.auto import tqdm

    if n < 4:
        raise ValueError(f"n must be >= 4 samples, got {n}")
    if weights not in ckpt_io.WEIGHT_SETS:
        raise ValueError(f"--weights must be 'ema' or 'raw', got {weights!r}")
    if record_times and weights != "ema":
        raise ValueError("--record-times writes the times that export and serving use with the EMA weights: "
                         "sweep --weights raw without it")
    start = time.perf_counter()
    path = _find(ckpt)
    meta = ckpt_io.load_meta(path)
    model = ckpt_io.load_model(path, which=weights).to(device)
    kind, sampler = meta.kind, meta.sampler.name
    steps = tuple(steps) if steps else (DEFAULT_STUDENT_STEPS if kind == "consistency" else DEFAULT_TEACHER_STEPS)
    if any(int(s) < 1 for s in steps):
        raise ValueError(f"--steps must be positive integers, got {list(steps)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_ds = load_split(meta, "train")
    test_ds = load_split(meta, "test")
    mixture = train_ds.mixture
    is_image = train_ds.spec.kind == "image"
    report: dict[str, Any] = {"checkpoint": str(path), "kind": kind, "data": train_ds.spec.name, "n": n, "seed": seed,
                              "objectives": meta.objectives, "step": meta.step, "weights": weights,
                              "hardware": hardware(), "quality": [], "figures": []}
    tasks = len(steps) + (3 if mixture is not None and kind == "diffusion" else 1)
    bar = tqdm(total=tasks, desc="eval", disable=not progress)

    ev = evaluator_for(train_ds, split="train", num_classes=model.num_classes, inception=inception, device=device)
    if ev is not None:
        from .metrics import frechet_distance

        report["reference"] = {"fd_test_vs_train": frechet_distance(ev.features(test_ds.x), ev.ref_features)}
    elif is_image:
        report["note"] = "no feature network for this data set: pass inception=PATH for FD/KID"

    def score(run: SampleRun) -> float:
        if mixture is not None:
            from .metrics import sliced_wasserstein

            ref = mixture.sample(run.samples.shape[0], torch.Generator().manual_seed(seed + 8), dtype=torch.float64)
            return sliced_wasserstein(run.samples.double(), ref, generator=torch.Generator().manual_seed(1), p=1)
        if ev is not None:
            return float(ev.quality(run.samples, None)["fd"])
        raise ValueError("--sweep-t-mid needs gmm data, digits, or --inception for other image data")

    times = ckpt_io.recorded_times(meta) if kind == "consistency" else {}
    if sweep_t_mid and kind == "consistency":
        bar.set_postfix_str("t_mid sweep")
        nll = None if mixture is None else (lambda run: -float(mixture.log_prob(run.samples.double()).mean()))
        sweep = t_mid_sweep(model, score, n=n, seed=seed + 7, device=device, guard_fn=nll,
                            guard_name="minus the mean exact log-likelihood")
        report["t_mid_sweep"] = sweep
        warning = two_step_warning(sweep, "sliced W1" if mixture is not None else "FD")
        if warning:
            report.setdefault("warnings", []).append(warning)
        times = {**times, 1: [sweep["times"][0]], 2: sweep["times"]}
        if record_times:
            ckpt_io.record_times(path, {1: times[1], 2: times[2]})
            report["recorded_times"] = {"1": times[1], "2": times[2]}
    elif record_times:
        raise ValueError("record_times needs sweep_t_mid on a consistency checkpoint")
    report["times"] = {str(k): v for k, v in times.items()}

    runs: list[SampleRun] = []
    for s in steps:
        bar.set_postfix_str(f"{sampler} {s} steps")
        run = generate(model, sampler, int(s), n, seed=seed, device=device, ts=times.get(int(s)))
        runs.append(run)
        if mixture is not None:
            from .gmm_diagnostics import sample_quality

            q = sample_quality(run.samples, mixture, generator=torch.Generator().manual_seed(seed)).to_dict()
        elif ev is not None:
            q = ev.quality(run.samples, run.labels)
        else:
            q = {}
        report["quality"].append(_row(run, q))
        bar.update(1)

    g = torch.Generator().manual_seed(seed + 1)
    if kind == "diffusion":
        if mixture is not None:
            from . import gmm_diagnostics as gd

            bar.set_postfix_str("exact diagnostics")
            t0 = time.perf_counter()
            diag = {
                "score_error": [b.to_dict() for b in gd.score_error(model, mixture, n=diagnostics_n, generator=g)],
                "fpe_residual": [b.to_dict() for b in gd.fpe_residual(model, mixture, n=diagnostics_n // 2,
                                                                      generator=g)],
                "cp_violation": [b.to_dict() for b in gd.cp_violation(model, mixture, n=diagnostics_n // 4,
                                                                      generator=g)],
            }
            report["diagnostics"] = diag
            report["diagnostics_seconds"] = time.perf_counter() - t0
            report["stf_target_variance"] = [v.to_dict() for v in gd.stf_target_variance(mixture, generator=g,
                                                                                         repeats=1)]
            bar.update(1)
        bar.set_postfix_str("PF-ODE likelihood")
        from .likelihood import pf_ode_nll

        k = nll_n if nll_n is not None else (min(n, 500) if not is_image else 32)
        if k > 0:
            x = test_ds.x[:k]
            y = None if test_ds.y is None or model.num_classes == 0 else test_ds.y[:k].to(device)
            res = pf_ode_nll(model, x.to(device), class_labels=y, generator=g, levels=256 if is_image else None,
                             dequantize=is_image)
            row = {"n": k, **res.to_dict()}
            if mixture is not None:
                row["true_nll_nats"] = float(-mixture.log_prob(x).mean())
            report["nll"] = row
        bar.update(1)
        if mixture is not None:
            bar.update(1)
    else:
        bar.set_postfix_str("ODE error")
        from .ode_error import ode_error

        eps = torch.randn((min(n, 1000), *model.sample_shape), generator=g).to(device)
        labels = (torch.arange(eps.shape[0]) % model.num_classes).to(device) if model.num_classes > 0 else None
        rows = []
        if mixture is not None:
            from .gmm_diagnostics import exact_model

            ex = exact_model(mixture, sigma_data=model.sigma_data)
            rows.append({"reference": "exact PF-ODE (Heun 18)", **ode_error(model, ex, eps).to_dict()})
        if teacher is not None:
            tm = ckpt_io.load_model(_find(teacher)).to(device)
            rows.append({"reference": f"teacher {teacher} (Heun 18)",
                         **ode_error(model, tm, eps, class_labels=labels).to_dict()})
        if rows:
            report["ode_error"] = rows
        if mixture is not None and model.num_classes == 0:
            from .gmm_diagnostics import consistency_map_error

            bands = consistency_map_error(model.cpu(), mixture, n=diagnostics_n, generator=g)
            model.to(device)
            report["map_error"] = [b.to_dict() for b in bands]
        bar.update(1)
    bar.close()

    # figures
    metric = "fd" if is_image else "sliced_w2"
    if report["quality"] and metric in report["quality"][0]:
        report["figures"].append(str(plot_quality_vs_nfe(report["quality"], metric, out / "quality_vs_nfe.png",
                                                         f"{train_ds.spec.name}: {metric} vs NFE ({kind})")))
    if report.get("diagnostics"):
        report["figures"].append(str(plot_per_sigma(report["diagnostics"], out / "per_sigma.png",
                                                    "exact diagnostics per sigma band")))
    for run in runs:
        name = f"samples_{run.sampler}_{run.steps}.png"
        report["figures"].append(str(plot_samples(run.samples, out / name, f"{run.sampler}, {run.steps} steps ({run.nfe} NFE)",
                                                  mixture=mixture)))
    report["seconds"] = time.perf_counter() - start
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    write_markdown(report, out / "report.md")
    return report


__all__ = ["SampleRun", "dataset_args", "evaluate_checkpoint", "generate", "markdown_table", "model_images",
           "t_mid_sweep", "two_step_warning", "write_markdown"]
