"""The reproduction study (issue 8, part 3): train and evaluate teachers and students through the real CLI and
evaluation API, then write docs/results.md (tables, plots, the exact commands, hardware, wall time).

    python scripts/study.py --part gmm                       # reduced CPU setting (~20 min on 2 busy cores)
    python scripts/study.py --part gmm --teacher-steps 3000 --student-steps 1000 --seeds 0,1,2,3,4   # full gmm2d
    python scripts/study.py --part digits --teacher-steps 6000 --student-steps 2000 --device cuda    # GPU

(a) teachers plain, +CP, +FP, +STF, +all at equal steps, >= 3 seeds, mean +- std: sample quality at 35 NFE
    (Heun 18) against the true density, PF-ODE NLL, and the exact per-sigma diagnostics (gmm);
(b) students sCT, sCD (from the best teacher), Direct CM and CD at 1 and 2 steps against the teacher at 35 NFE,
    with the ODE error (Direct-CM paper) against the teacher's Heun solution and the exact PF-ODE.
Every run is a `quickstep-train fit` subprocess (its command line is recorded); every evaluation is
`quickstep.train.eval.report.evaluate_checkpoint` (the same code as `quickstep-train eval`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEACHERS = ("plain", "cp", "fp", "stf", "all")
STUDENTS = ("sct", "scd", "direct-cm", "cd")
NEEDS_TEACHER = {"scd", "direct-cm", "cd"}


def run_fit(preset: str, out: Path, steps: int, seed: int, extra: list[str], log: list[dict[str, Any]],
            teacher: Path | None = None) -> tuple[Path, float]:
    """`quickstep-train fit` in a subprocess; returns (run dir, wall seconds) and records the command."""
    cmd = [sys.executable, "-m", "quickstep.train.cli", "fit", "--preset", preset, "--out", str(out),
           "--steps", str(steps), "--set", f"seed={seed}", *sum((["--set", e] for e in extra), [])]
    if teacher is not None:
        cmd += ["--teacher", str(teacher)]
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    shown = " ".join(["quickstep-train", *cmd[3:]])
    log.append({"command": shown, "seconds": round(secs, 1), "rc": proc.returncode})
    if proc.returncode != 0:
        raise RuntimeError(f"{shown} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return out, secs


def mean_std(vals: list[float]) -> str:
    """'m ± s' (s over seeds; '-' when a single value)."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    m = statistics.fmean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{m:.4g} ± {s:.2g}"


def band_mean(bands: list[dict[str, Any]], lo: float = 0.0, hi: float = float("inf")) -> float:
    """Average of the per-band means whose band lies inside [lo, hi]."""
    sel = [b["mean"] for b in bands if b["sigma_lo"] >= lo and b["sigma_hi"] <= hi]
    return statistics.fmean(sel) if sel else float("nan")


def teacher_row(rep: dict[str, Any]) -> dict[str, float]:
    """Headline numbers of one teacher report (35-NFE Heun row + diagnostics)."""
    q = [r for r in rep["quality"] if r["nfe"] == 35][0]
    d = rep.get("diagnostics", {})
    return {"sliced_w2": q.get("sliced_w2"), "mmd": q.get("mmd"), "log_likelihood": q.get("log_likelihood"),
            "fd": q.get("fd"), "s_per_img": q["seconds_per_image"],
            "nll": (rep.get("nll") or {}).get("nll_nats"), "bpd": (rep.get("nll") or {}).get("bits_per_dim"),
            "score_err": band_mean(d["score_error"]) if d else None,
            "fpe": band_mean(d["fpe_residual"]) if d else None,
            "cp": band_mean(d["cp_violation"]) if d else None}


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    from quickstep.train.eval.report import evaluate_checkpoint, hardware

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    data = args.part
    prefix = "gmm2d" if data == "gmm" else "digits"
    # sCD needs a teacher whose time embedding is smooth in t (see the gmm2d-scd preset): same for every teacher
    extra = ["model.backbone.time_scale=10"] if data == "gmm" else []
    if args.device != "auto":
        extra.append(f"device={args.device}")
    log: list[dict[str, Any]] = []
    start = time.perf_counter()
    results: dict[str, Any] = {"hardware": hardware(), "teachers": {}, "students": {}, "commands": log,
                               "settings": vars(args)}
    teacher_dirs: dict[str, dict[int, Path]] = {}
    for variant in TEACHERS:
        rows = []
        for seed in seeds:
            run_dir, secs = run_fit(f"{prefix}-{variant}", out / f"teacher-{variant}-s{seed}", args.teacher_steps,
                                    seed, extra, log)
            teacher_dirs.setdefault(variant, {})[seed] = run_dir
            rep = evaluate_checkpoint(run_dir, steps=(1, 4, 18) if data == "gmm" else (18,), n=args.n,
                                      out=out / f"eval-teacher-{variant}-s{seed}", nll_n=args.nll_n,
                                      diagnostics_n=args.diag_n, seed=seed, device=args.device_eval,
                                      progress=False)
            rows.append({**teacher_row(rep), "train_seconds": secs, "report": rep})
            print(f"teacher {variant} seed {seed}: {json.dumps({k: v for k, v in rows[-1].items() if k != 'report'})}",
                  flush=True)
        results["teachers"][variant] = rows
    # the best teacher: lowest mean sliced W2 (gmm) / FD (digits) at 35 NFE
    key = "sliced_w2" if data == "gmm" else "fd"
    best = min(TEACHERS, key=lambda v: statistics.fmean(r[key] for r in results["teachers"][v]))
    results["best_teacher"] = best
    teacher_ckpt = teacher_dirs[best][seeds[0]]
    for student in STUDENTS:
        rows = []
        for seed in seeds[: args.student_seeds]:
            run_dir, secs = run_fit(f"{prefix}-{student}", out / f"student-{student}-s{seed}", args.student_steps,
                                    seed, extra if student == "sct" else [e for e in extra if "time_scale" not in e],
                                    log, teacher=teacher_ckpt if student in NEEDS_TEACHER else None)
            rep = evaluate_checkpoint(run_dir, steps=(1, 2), n=args.n, out=out / f"eval-student-{student}-s{seed}",
                                      teacher=teacher_ckpt, seed=seed, device=args.device_eval, progress=False)
            rows.append({"train_seconds": secs, "report": rep})
            print(f"student {student} seed {seed}: "
                  f"{json.dumps([{k: r.get(k) for k in ('nfe', key, 'seconds_per_image')} for r in rep['quality']])}",
                  flush=True)
        results["students"][student] = rows
    results["seconds"] = time.perf_counter() - start
    (out / "study.json").write_text(json.dumps(results, indent=2, default=float))
    return results


def write_results_md(results: dict[str, Any], path: Path, figures_dir: Path) -> None:
    """docs/results.md from the study results."""
    data = results["settings"]["part"]
    key = "sliced_w2" if data == "gmm" else "fd"
    figures_dir.mkdir(parents=True, exist_ok=True)
    s = results["settings"]
    lines = [f"# Results: the reproduction study ({data})", "",
             f"Hardware: {results['hardware']}. Total wall time: {results['seconds'] / 60:.1f} min "
             f"(CPU shared with other jobs; times are indicative).", "",
             f"Setting: teachers {s['teacher_steps']} steps, students {s['student_steps']} steps, seeds {s['seeds']}, "
             f"{s['n']} samples per evaluation. Reproduce with:", "", "```",
             f"python scripts/study.py --part {data} --teacher-steps {s['teacher_steps']} "
             f"--student-steps {s['student_steps']} --seeds {s['seeds']} --n {s['n']} --out {s['out']}", "```", "",
             "## (a) Teachers at equal steps (Heun 18 steps = 35 NFE; mean ± std over seeds)", ""]
    cols = ["teacher", key, "mmd", "log_likelihood", "nll (test, nats)", "score err (σ²-norm.)", "FPE residual",
            "CP violation", "s/img @35 NFE", "train s"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for v, rows in results["teachers"].items():
        g = lambda k, rows=rows: mean_std([r[k] for r in rows])  # noqa: E731
        lines.append(f"| {v} | {g(key)} | {g('mmd')} | {g('log_likelihood')} | {g('nll')} | {g('score_err')} | "
                     f"{g('fpe')} | {g('cp')} | {g('s_per_img')} | {g('train_seconds')} |")
    floor = results["teachers"]["plain"][0]["report"]["quality"][0]
    if "true_sliced_w2" in floor:
        lines += ["", f"True-sample floor: sliced W2 {floor['true_sliced_w2']:.4g}, MMD {floor['true_mmd']:.3g}, "
                      f"log-likelihood {floor['true_log_likelihood']:.4g}; exact test NLL "
                      f"{results['teachers']['plain'][0]['report']['nll'].get('true_nll_nats', float('nan')):.4g} nats."]
    lines += ["", f"Best teacher (lowest {key}): **{results['best_teacher']}** (its seed-{s['seeds'].split(',')[0]} "
                  "checkpoint is the sCD / Direct CM / CD teacher).", "",
              "## (b) Students against the teacher", ""]
    cols = ["model", "NFE", key, "mmd", "log_likelihood", "s/img", "ODE err vs teacher", "ODE err vs exact", "train s"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    best_rows = results["teachers"][results["best_teacher"]]
    tq = [r for r in best_rows[0]["report"]["quality"] if r["nfe"] == 35][0]
    lines.append(f"| teacher ({results['best_teacher']}, Heun) | 35 | {tq.get(key, float('nan')):.4g} | "
                 f"{tq.get('mmd', float('nan')):.3g} | {tq.get('log_likelihood', float('nan')):.4g} | "
                 f"{tq['seconds_per_image']:.2e} | - | - | - |")
    for st, rows in results["students"].items():
        for nfe in (1, 2):
            qs = [[q for q in r["report"]["quality"] if q["nfe"] == nfe][0] for r in rows]
            ode = [r["report"].get("ode_error", []) for r in rows]
            vs_t = [next((o["mse"] for o in od if o["reference"].startswith("teacher")), None) for od in ode]
            vs_x = [next((o["mse"] for o in od if o["reference"].startswith("exact")), None) for od in ode]
            lines.append(f"| {st} | {nfe} | {mean_std([q.get(key) for q in qs])} | "
                         f"{mean_std([q.get('mmd') for q in qs])} | {mean_std([q.get('log_likelihood') for q in qs])} | "
                         f"{mean_std([q['seconds_per_image'] for q in qs])} | "
                         f"{mean_std(vs_t) if nfe == 1 else '-'} | {mean_std(vs_x) if nfe == 1 else '-'} | "
                         f"{mean_std([r['train_seconds'] for r in rows])} |")
    # figures: copy the per-sigma plots of each teacher's first seed and the student sample scatters
    figs = []
    for v, rows in results["teachers"].items():
        for f in rows[0]["report"]["figures"]:
            if f.endswith("per_sigma.png") or f.endswith("samples_heun_18.png"):
                dst = figures_dir / f"teacher-{v}-{Path(f).name}"
                shutil.copy(f, dst)
                figs.append(dst)
    for st, rows in results["students"].items():
        for f in rows[0]["report"]["figures"]:
            if "samples_consistency" in f:
                dst = figures_dir / f"student-{st}-{Path(f).name}"
                shutil.copy(f, dst)
                figs.append(dst)
    lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.relative_to(path.parent)})" for p in figs]
    lines += ["", "## Commands run (with wall time)", "", "```"]
    lines += [f"{c['command']}    # {c['seconds']} s" for c in results["commands"]] + ["```", ""]
    lines += ["## Reading (generated from the numbers above; differences within one std are not claims)", ""]
    lines += reading(results, key)
    path.write_text("\n".join(lines))


def reading(results: dict[str, Any], key: str) -> list[str]:
    """One line per paper claim: the compared means, their stds and whether the claim held here."""
    t = results["teachers"]

    def ms(v: str, k: str) -> tuple[float, float]:
        vals = [r[k] for r in t[v] if r.get(k) is not None]
        return (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0) if vals else (float("nan"),) * 2

    def verdict(a: tuple[float, float], b: tuple[float, float]) -> str:
        if a[1] == 0 and b[1] == 0:
            return "single seed, no claim (" + ("lower" if a[0] < b[0] else "not lower") + ")"
        if a[0] < b[0] - max(a[1], b[1]):
            return "held"
        if a[0] > b[0] + max(a[1], b[1]):
            return "did NOT hold (reversed)"
        return "not resolved (within one std)"

    out = []
    for name, v, k, what in (("CDM: CP lowers the CP violation", "cp", "cp", "CP violation"),
                             ("FP-Diffusion: FP lowers the score-FPE residual", "fp", "fpe", "FPE residual"),
                             ("FP-Diffusion: FP improves likelihood", "fp", "nll", "test NLL"),
                             ("STF: STF improves samples at 35 NFE", "stf", key, key),
                             ("CDM: CP improves samples", "cp", key, key)):
        a, b = ms(v, k), ms("plain", k)
        out.append(f"- {name}: {what} {a[0]:.4g} ± {a[1]:.2g} (+{v}) vs {b[0]:.4g} ± {b[1]:.2g} (plain): "
                   f"**{verdict(a, b)}**.")
    st = results["students"]

    def q(student: str, nfe: int, k: str) -> float:
        vals = [[x for x in r["report"]["quality"] if x["nfe"] == nfe][0].get(k) for r in st[student]]
        return statistics.fmean(v for v in vals if v is not None)

    def ode(student: str) -> float:
        vals = [next((o["mse"] for o in r["report"].get("ode_error", []) if o["reference"].startswith("teacher")),
                     float("nan")) for r in st[student]]
        return statistics.fmean(vals)

    if "scd" in st:
        verdicts = {m: "held" if q(m, 2, key) < q(m, 1, key) else "did not hold" for m in ("scd", "sct") if m in st}
        out.append(f"- sCM: 2 steps beat 1 step (sCD {key} {q('scd', 2, key):.4g} vs {q('scd', 1, key):.4g}: "
                   f"**{verdicts.get('scd', '-')}**; sCT {q('sct', 2, key):.4g} vs {q('sct', 1, key):.4g}: "
                   f"**{verdicts.get('sct', '-')}**).")
    if "direct-cm" in st and "cd" in st:
        lower_ode = ode("direct-cm") < ode("cd")
        worse = q("direct-cm", 1, key) > q("cd", 1, key)
        out.append(f"- Direct CMs: lower ODE error ({ode('direct-cm'):.4g} vs CD {ode('cd'):.4g}: "
                   f"{'yes' if lower_ode else 'no'}) but worse 1-step samples ({key} {q('direct-cm', 1, key):.4g} "
                   f"vs CD {q('cd', 1, key):.4g}: {'yes' if worse else 'no'}).")
    out.append("")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("gmm", "digits"), default="gmm")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--teacher-steps", type=int, default=400)
    p.add_argument("--student-steps", type=int, default=300)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--student-seeds", type=int, default=1, help="how many of the seeds to train students on")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--nll-n", type=int, default=256)
    p.add_argument("--diag-n", type=int, default=256)
    p.add_argument("--device", default="auto", help="training device (auto|cpu|cuda)")
    p.add_argument("--device-eval", default="cpu")
    p.add_argument("--results", default=None, help="markdown output (default docs/results.md; docs/results-digits.md)")
    p.add_argument("--from-json", default=None, help="only rewrite the markdown from an earlier study.json")
    args = p.parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    else:
        results = run_study(args)
    md = Path(args.results or (ROOT / "docs" / ("results.md" if args.part == "gmm" else "results-digits.md")))
    write_results_md(results, md, md.parent / "results")
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
