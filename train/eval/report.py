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
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core import checkpoint as ckpt_io
from ..core.sampling import heun_teacher_sample, sample_consistency

DEFAULT_STUDENT_STEPS = (1, 2)
DEFAULT_TEACHER_STEPS = (2, 4, 9, 18)
T_MID_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)  # radians; sigma 0.1 .. 1.8 at sigma_d 0.5


@dataclass(frozen=True)
class SampleRun:
    """Samples of one sampler setting with their cost."""

    sampler: str  # "consistency" | "heun"
    steps: int
    nfe: int
    samples: torch.Tensor  # [n, ...] on the CPU
    labels: torch.Tensor | None
    seconds_per_image: float


def checkpoint_kind(config: dict[str, Any]) -> str:
    """'consistency' when the checkpoint was trained with a student objective, else 'diffusion' (the trainer's
    rule, `quickstep.train.loop.checkpoint_kind`)."""
    from ..loop import checkpoint_kind as kind_of

    return kind_of(config)


def _find(path: str | Path) -> Path:
    """A checkpoint directory, or the latest checkpoint of a run directory (the trainer's rule)."""
    from ..loop import find_checkpoint

    return find_checkpoint(path)


def _dataset(config: dict[str, Any], split: str):
    from ..data import load_dataset

    d = (config.get("train") or {}).get("data")
    if not d:
        raise ValueError("the checkpoint's config.json has no train.data section; cannot tell which data it models")
    seed = int((config.get("train") or {}).get("seed", 0))
    # the data as trained on (same resolution and crop), never augmented: x-flip lives in the trainer only
    return load_dataset(d["name"], path=d.get("path"), split=split, seed=seed, resolution=d.get("resolution"),
                        crop=d.get("crop", "none"), **dict(d.get("options") or {}))


def generate(model, sampler: str, steps: int, n: int, *, seed: int = 0, batch_size: int = 500,
             device: torch.device | str = "cpu", ts: Sequence[float] | None = None) -> SampleRun:
    """n samples from `model` with the consistency (NFE = steps; times `ts`, default the core's) or Heun
    (NFE = 2 steps - 1) sampler."""
    if steps < 1 or n < 1:
        raise ValueError(f"steps and n must be >= 1, got steps={steps}, n={n}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % model.num_classes if model.num_classes > 0 else None
    outs, seconds = [], 0.0
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        eps = torch.randn((b, *model.sample_shape), generator=g).to(device)
        y = None if labels is None else labels[i : i + b].to(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            if sampler == "consistency":
                extra = [model.sigma_data * torch.randn((b, *model.sample_shape), generator=g).to(device)
                         for _ in range(steps - 1)]
                x = sample_consistency(model, model.sigma_data * eps, steps=steps, ts=ts, class_labels=y,
                                       extra_noise=extra)
            elif sampler == "heun":
                x = heun_teacher_sample(model, eps, num_steps=steps, class_labels=y)
            else:
                raise ValueError(f"sampler must be 'consistency' or 'heun', got {sampler!r}")
        seconds += time.perf_counter() - t0
        outs.append(x.cpu())
    nfe = steps if sampler == "consistency" else 2 * steps - 1
    return SampleRun(sampler, steps, nfe, torch.cat(outs), labels, seconds / n)


# ----------------------------------------------------------------------------------------------- quality
def _image_quality(run: SampleRun, ref_feats: torch.Tensor, feat_fn, *, classify_fn=None,
                   kid_normalize: bool = False) -> dict[str, Any]:
    from .metrics import frechet_distance, kid, precision_recall

    x = run.samples.clamp(-1, 1)
    f = feat_fn(x)
    k_mean, k_std = kid(f, ref_feats, subsets=20, subset_size=min(500, len(f), len(ref_feats)),
                        normalize=kid_normalize)
    prec, rec = precision_recall(ref_feats, f, k=3)
    q: dict[str, Any] = {"fd": frechet_distance(f, ref_feats), "kid": k_mean, "kid_std": k_std,
                         "precision": prec, "recall": rec}
    if classify_fn is not None and run.labels is not None:
        q["class_accuracy"] = float((classify_fn(x) == run.labels).float().mean())
    return q


def _row(run: SampleRun, quality: dict[str, Any]) -> dict[str, Any]:
    return {"sampler": run.sampler, "steps": run.steps, "nfe": run.nfe, "seconds_per_image": run.seconds_per_image,
            **quality}


def t_mid_sweep(model, score_fn, *, n: int, seed: int, grid: Sequence[float] = T_MID_GRID,
                device: torch.device | str = "cpu") -> dict[str, Any]:
    """The 2-step sampler's intermediate time as a property of the model: 2-step samples at every t_mid of `grid`
    (same noise), scored by `score_fn(SampleRun) -> float` (lower is better), on noise seed `seed` (use a
    different seed for the reported numbers).  Returns {'grid', 'scores', 'chosen', 'times': [t_max, chosen]}."""
    from ..core.trigflow import t_max

    tm = t_max(sigma_data=model.sigma_data)
    scores = [float(score_fn(generate(model, "consistency", 2, n, seed=seed, device=device, ts=[tm, float(t)])))
              for t in grid]
    best = min(range(len(grid)), key=lambda i: scores[i])
    return {"grid": [float(t) for t in grid], "scores": scores, "chosen": float(grid[best]),
            "times": [tm, float(grid[best])], "n": n, "seed": seed}


# ----------------------------------------------------------------------------------------------- plots
def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is in the train extra
        raise ImportError("report plots need matplotlib: pip install 'quickstep[train]'") from e
    return plt


def plot_quality_vs_nfe(rows: list[dict[str, Any]], metric: str, path: Path, title: str) -> Path:
    """Line plot of `metric` against NFE (log x axis)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    pts = sorted((r["nfe"], r[metric]) for r in rows if metric in r)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
    ax.set_xscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_per_sigma(bands: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    """Per-sigma-band diagnostics (log-log), one line per diagnostic, band centres on x."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    for name, vals in bands.items():
        xs = [math.sqrt(v["sigma_lo"] * v["sigma_hi"]) for v in vals]
        ys = [max(abs(v["mean"]), 1e-12) for v in vals]
        ax.plot(xs, ys, "o-", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sigma (band centre)")
    ax.set_ylabel("value (|mean|)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_samples(run: SampleRun, path: Path, title: str, mixture=None, max_images: int = 64) -> Path:
    """An image grid (images) or a scatter over the true density's contours (2-D vectors)."""
    plt = _plt()
    x = run.samples
    if x.ndim == 4:
        k = min(max_images, x.shape[0])
        nrow = int(math.ceil(math.sqrt(k)))
        imgs = ((x[:k].clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)  # [k, H, W, C]
        h, w, c = imgs.shape[1:]
        grid = torch.ones(nrow * h, nrow * w, c)
        for i in range(k):
            r, col = divmod(i, nrow)
            grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = imgs[i]
        fig, ax = plt.subplots(figsize=(4, 4), dpi=120)
        ax.imshow(grid.squeeze(-1).numpy(), cmap="gray" if c == 1 else None, vmin=0, vmax=1)
        ax.axis("off")
    else:
        fig, ax = plt.subplots(figsize=(4, 4), dpi=120)
        if mixture is not None and mixture.dim == 2:
            g = torch.linspace(-2, 2, 120, dtype=torch.float64)
            xx, yy = torch.meshgrid(g, g, indexing="xy")
            lp = mixture.log_prob(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)).reshape(120, 120)
            ax.contour(xx.numpy(), yy.numpy(), lp.numpy(), levels=8, linewidths=0.5, colors="grey")
        pts = x[:, :2] if x.shape[1] >= 2 else torch.cat([x, torch.zeros_like(x)], 1)
        ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=2, alpha=0.5)
        ax.set_xlim(-2, 2)
        ax.set_ylim(-2, 2)
        ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- markdown
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e4:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of `columns` from `rows` (missing values: '-')."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "-")) for c in columns) + " |")
    return "\n".join(lines)


def write_markdown(report: dict[str, Any], path: Path) -> Path:
    """report.md: the sample-quality table (with NFE and s/img), the diagnostics and the figures."""
    lines = [f"# Evaluation of `{report['checkpoint']}`", "",
             f"- kind: **{report['kind']}**, data: `{report['data']}`, samples per setting: {report['n']}, "
             f"seed {report['seed']}",
             f"- hardware: {report['hardware']}; total wall time {report['seconds']:.1f} s", ""]
    rows = report["quality"]
    if rows:
        cols = ["sampler", "steps", "nfe", "seconds_per_image"] + [
            k for k in rows[0] if k not in ("sampler", "steps", "nfe", "seconds_per_image")]
        lines += ["## Sample quality (per sampler setting)", "", markdown_table(rows, cols), ""]
    if report.get("reference"):
        lines += ["Reference floor (true data against true data, same metric): "
                  + ", ".join(f"{k} = {_fmt(v)}" for k, v in report["reference"].items()), ""]
    for key, title in (("nll", "Likelihood (PF-ODE)"), ("ode_error", "ODE error (1-step student vs Heun PF-ODE)")):
        if report.get(key):
            items = report[key] if isinstance(report[key], list) else [report[key]]
            lines += [f"## {title}", "", markdown_table(items, list(items[0])), ""]
    if report.get("map_error"):
        lines += ["## Exact consistency-map error E||f(x_t, t) - Phi*(x_t, t)||^2 per sigma band", "",
                  markdown_table(report["map_error"], list(report["map_error"][0])), ""]
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


def hardware() -> str:
    """One line describing the machine the evaluation ran on."""
    import os

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {dev}"


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
) -> dict[str, Any]:
    """Evaluate a checkpoint (or run directory: its latest checkpoint) and write report.json, report.md and
    PNG figures into `out`.  `steps`: consistency steps for students (default 1, 2), Heun steps for teachers
    (default 2, 4, 9, 18 = 3..35 NFE).  Students sample at the times their checkpoint records (else the core
    defaults); `sweep_t_mid` first sweeps the 2-step intermediate time against the data (sliced W1 on mixtures,
    FD on images; noise seed `seed` + 7, reported numbers on `seed`) and samples 2 steps at the best one;
    `record_times` writes the chosen times into the checkpoint's config.json (export and serving then use them).
    Returns the report dict."""
    from tqdm.auto import tqdm

    if n < 4:
        raise ValueError(f"n must be >= 4 samples, got {n}")
    start = time.perf_counter()
    path = _find(ckpt)
    config = ckpt_io.load_config(path)
    model = ckpt_io.load_model(path).to(device)
    kind = checkpoint_kind(config)
    sampler = "consistency" if kind == "consistency" else "heun"
    steps = tuple(steps) if steps else (DEFAULT_STUDENT_STEPS if kind == "consistency" else DEFAULT_TEACHER_STEPS)
    if any(int(s) < 1 for s in steps):
        raise ValueError(f"--steps must be positive integers, got {list(steps)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_ds = _dataset(config, "train")
    test_ds = _dataset(config, "test")
    mixture = train_ds.mixture
    is_image = train_ds.spec.kind == "image"
    report: dict[str, Any] = {"checkpoint": str(path), "kind": kind, "data": train_ds.spec.name, "n": n, "seed": seed,
                              "objectives": config.get("objectives"), "step": config.get("step"),
                              "hardware": hardware(), "quality": [], "figures": []}
    tasks = len(steps) + (3 if mixture is not None and kind == "diffusion" else 1)
    bar = tqdm(total=tasks, desc="eval", disable=not progress)

    feat_fn = classify_fn = ref_feats = None
    if is_image:
        if train_ds.spec.name == "digits" and tuple(train_ds.spec.shape) == (1, 16, 16):
            from .classifier import classify, features

            feat_fn, classify_fn = features, (classify if model.num_classes == 10 else None)
        elif inception is not None:
            from .inception import inception_features, load_inception

            net = load_inception(inception, device=device)
            feat_fn = lambda x: inception_features(net, x)  # noqa: E731
        if feat_fn is not None:
            ref_feats = feat_fn(train_ds.x)
            from .metrics import frechet_distance

            report["reference"] = {"fd_test_vs_train": frechet_distance(feat_fn(test_ds.x), ref_feats)}
        else:
            report["note"] = "no feature network for this data set: pass inception=PATH for FD/KID"

    def score(run: SampleRun) -> float:
        if mixture is not None:
            from .metrics import sliced_wasserstein

            ref = mixture.sample(run.samples.shape[0], torch.Generator().manual_seed(seed + 8), dtype=torch.float64)
            return sliced_wasserstein(run.samples.double(), ref, generator=torch.Generator().manual_seed(1), p=1)
        if feat_fn is not None:
            return float(_image_quality(run, ref_feats, feat_fn, kid_normalize=inception is None)["fd"])
        raise ValueError("--sweep-t-mid needs gmm data, digits, or --inception for other image data")

    times = ckpt_io.recorded_times(config) if kind == "consistency" else {}
    if sweep_t_mid and kind == "consistency":
        bar.set_postfix_str("t_mid sweep")
        sweep = t_mid_sweep(model, score, n=n, seed=seed + 7, device=device)
        report["t_mid_sweep"] = sweep
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
        elif feat_fn is not None:
            q = _image_quality(run, ref_feats, feat_fn, classify_fn=classify_fn,
                               kid_normalize=inception is None)  # the digits classifier's features
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
        report["figures"].append(str(plot_samples(run, out / name, f"{run.sampler}, {run.steps} steps ({run.nfe} NFE)",
                                                  mixture=mixture)))
    report["seconds"] = time.perf_counter() - start
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    write_markdown(report, out / "report.md")
    return report


__all__ = ["SampleRun", "checkpoint_kind", "evaluate_checkpoint", "generate", "markdown_table", "t_mid_sweep",
           "write_markdown"]
