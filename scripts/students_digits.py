"""Issue 17 on digits: consistency students from one digits-stf teacher -- sCD with and without sCM's learned adaptive
weighting, sCT tuned from the teacher's weights, Direct CM and CD -- scored by FD (digits classifier features, train
split) at 1 and 2 steps against the teacher's 35-NFE FD.

    python scripts/students_digits.py --teacher runs/bundle-teacher --recipes scd-noaw,sct-tuned,dcm,cd --seeds 0,1,2
    python scripts/students_digits.py --summary

Each run is the real CLI a user runs -- `quickstep-train fit --preset digits-<method> --teacher T ...` (sCT:
`--set init_from=T`) and then
`quickstep-train eval --ckpt RUN --n N --sweep-t-mid --record-times` (the chosen 2-step times go into the
checkpoint, ready for `quickstep-export`) -- and writes docs/results/students/digits/<recipe>-s<seed>.json
(the eval report's quality rows, the t_mid sweep, the training wall time). Finished runs are skipped and a run
directory with a final checkpoint is only evaluated, and an interrupted run continues from its last checkpoint
(`--resume`, every 200 steps), so the script resumes after an interruption.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quickstep.train.loop import read_train_log, training_seconds

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "students" / "digits"
RUNS = ROOT / "runs" / "students" / "digits"
BIN = Path(sys.executable).parent
CKPT_EVERY = 200  # a killed run resumes from its last checkpoint (quickstep-train fit --resume)
DEFAULT_STEPS = 1200  # the bundle's student length (Makefile STUDENT_STEPS); other lengths are labelled <recipe>@<steps>
CURVE_EVERY = 200  # every run also scores its checkpoints every 200 steps: FD against steps and wall time (until the
# fifth session only runs longer than the default did, every 400 steps)


@dataclass(frozen=True)
class Recipe:
    """A student recipe: the digits preset it starts from, how it is given the teacher, and --set overrides."""

    preset: str
    overrides: tuple[str, ...] = ()
    init_only: bool = False  # True: the teacher only initialises the weights (init_from=...), no --teacher
    continues: str | None = None  # a run label: start from that run's EMA weights (init_from=<label>-s<seed>), with
    # a fresh optimiser and EMA; its steps and wall time count towards this run's compute


ANNEAL = ("optim.decay=linear", "optim.final_lr_ratio=0.0")  # the cool-down: the lr falls linearly to 0

RECIPES: dict[str, Recipe] = {
    # sCD with sCM's learned adaptive weighting (the paper's default) and without it (issue 17's fix on the mixtures)
    "scd-aw": Recipe("digits-scd", ("objectives.scd.adaptive_weighting=true",)),
    "scd-noaw": Recipe("digits-scd", ("objectives.scd.adaptive_weighting=false",)),
    # the other consistency students, each from its own preset, all from the same teacher
    "sct-tuned": Recipe("digits-sct-tuned", init_only=True),  # sCT from the teacher's weights (ECT-style tuning)
    "dcm": Recipe("digits-direct-cm"),  # Direct CM: regress onto the teacher's full Heun PF-ODE solution
    "cd": Recipe("digits-cd"),  # discrete-time consistency distillation (one teacher Heun step)
    # seventh session: Direct CM's FD is flat from step 1600 to 2000 at a constant lr.  Does annealing the lr to 0
    # over a continuation lower it, and is a continuation at the constant lr (the control: fresh optimiser and EMA
    # from the same weights) any different?
    "dcm-anneal": Recipe("digits-direct-cm", ANNEAL, continues="dcm@2000"),
    "dcm-cont": Recipe("digits-direct-cm", continues="dcm@2000"),
    # ... and does drawing the 1-step sampler's level (sigma_max) a quarter of the time, instead of 1/18, help?
    "dcm-top-anneal": Recipe("digits-direct-cm", (*ANNEAL, "objectives.direct_cm.top_level_prob=0.25"),
                             continues="dcm@2000"),
    # eighth session: is the cool-down limited by its length or by its batch?  `dcm-anneal --steps 1200` (twice the
    # steps at batch 64) against the same anneal at batch 128 for 600 steps: the same teacher solves and samples.
    "dcm-anneal-b128": Recipe("digits-direct-cm", ("batch_size=128", *ANNEAL), continues="dcm@2000"),
}


def _cli(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print("+ quickstep-train " + " ".join(args), flush=True)
    subprocess.run([str(BIN / "quickstep-train"), *args], check=True, env=env)


def _eval(ckpt: Path, out: Path, n: int, steps: str, sweep: bool) -> dict[str, Any]:
    if not (out / "report.json").exists():
        _cli("eval", "--ckpt", str(ckpt), "--n", str(n), "--steps", steps, "--out", str(out), "--no-progress",
             *(["--sweep-t-mid", "--record-times"] if sweep else []))
    return json.loads((out / "report.json").read_text())


def teacher_eval(teacher: Path, n: int) -> dict[str, Any]:
    """The teacher's FD at Heun 18 steps (35 NFE), same n and seed as the students."""
    return _eval(teacher, RUNS / f"eval-teacher-{teacher.name}", n, "18", sweep=False)


def run_label(name: str, steps: int) -> str:
    """A recipe's name in run directories and results: runs of another length than the default are another recipe,
    and a continuation always names its length (it has no default one)."""
    recipe = RECIPES.get(name)
    named = steps != DEFAULT_STEPS or (recipe is not None and recipe.continues is not None)
    return f"{name}@{steps}" if named else name


def _wall_at_steps(run: Path) -> dict[int, float]:
    """Training seconds at each logged step (a resume's stopped time left out: `quickstep.train.loop.training_seconds`)."""
    rows = read_train_log(run)
    return {int(r["step"]): s for r, s in zip(rows, training_seconds(rows), strict=True)}


def fd_curve(run: Path, steps: int, n: int) -> list[dict[str, float]]:
    """1- and 2-step FD of every CURVE_EVERY-step checkpoint before the last (its 2-step t_mid is the preset's)."""
    wall = _wall_at_steps(run)
    rows = []
    for step in range(CURVE_EVERY, steps, CURVE_EVERY):
        ckpt = run / f"step-{step:07d}"
        if not (ckpt / "config.json").exists():
            continue
        rep = _eval(ckpt, run / f"eval-{step:07d}", n, "1,2", sweep=False)
        fd = {q["steps"]: q["fd"] for q in rep["quality"]}
        rows.append({"step": step, "fd_1": fd[1], "fd_2": fd[2],
                     "train_seconds": wall.get(max((s for s in wall if s <= step), default=-1), 0.0)})
    return rows


def run_name(label: str, seed: int) -> str:
    """A run's directory under runs/students/digits and its result JSON's stem: `<label>-s<seed>`."""
    return f"{label}-s{seed}"


def _base(recipe: Recipe, seed: int) -> dict[str, Any] | None:
    """The run a continuation starts from: its label, steps and training seconds (from its result JSON)."""
    if recipe.continues is None:
        return None
    name = run_name(recipe.continues, seed)
    base = json.loads((OUT / f"{name}.json").read_text())
    return {"run": name, "steps": base["steps"], "train_seconds": base["train_seconds"]}


def run_one(name: str, seed: int, teacher: Path, steps: int, n: int) -> Path:
    label, recipe = run_label(name, steps), RECIPES[name]
    dest = OUT / f"{run_name(label, seed)}.json"
    if dest.exists():
        print(f"skip {dest.relative_to(ROOT)} (done)", flush=True)
        return dest
    run = RUNS / run_name(label, seed)
    final = run / f"step-{steps:07d}"
    if not (final / "config.json").exists() or not (run / "wall_seconds.txt").exists():
        # an interrupted run continues from its last checkpoint (every 200 steps); its wall time adds up
        done = sorted(run.glob("step-*/config.json"))
        spent = float((run / "partial_seconds.txt").read_text()) if done and (run / "partial_seconds.txt").exists() \
            else 0.0
        if not done and run.exists():
            shutil.rmtree(run)
        sets = [f"seed={seed}", "log.samples=false", "log.tensorboard=false", "log.progress=false",
                f"log.ckpt_every={CKPT_EVERY}", "log.keep_checkpoints=0",
                *([f"init_from={teacher}"] if recipe.init_only else []),
                *([f"init_from={RUNS / run_name(recipe.continues, seed)}"] if recipe.continues else []), *recipe.overrides]
        t0 = time.perf_counter()
        try:
            if done:  # the saved config and teacher are reused
                _cli("fit", "--resume", str(run), "--out", str(run), "--steps", str(steps))
            else:
                _cli("fit", "--preset", recipe.preset, *([] if recipe.init_only else ["--teacher", str(teacher)]),
                     "--out", str(run), "--steps", str(steps), *[a for s in sets for a in ("--set", s)])
        finally:
            spent += time.perf_counter() - t0
            run.mkdir(parents=True, exist_ok=True)
            (run / "partial_seconds.txt").write_text(f"{spent:.1f}\n")
        (run / "wall_seconds.txt").write_text(f"{spent:.1f}\n")
    report = _eval(run, run / "eval", n, "1,2", sweep=True)
    t = teacher_eval(teacher, n)
    curve = fd_curve(run, steps, n)
    res = {"recipe": name, "seed": seed, "steps": steps, "fd_curve": curve, "preset": recipe.preset,
           "overrides": list(recipe.overrides), "continues": _base(recipe, seed),
           "teacher": teacher.name,
           "train_seconds": float((run / "wall_seconds.txt").read_text()),
           "teacher_fd_35nfe": t["quality"][0]["fd"], "quality": report["quality"],
           "t_mid_sweep": report.get("t_mid_sweep"), "times": report.get("times"),
           "reference": report.get("reference"), "n": n,
           "command": " ".join(["python scripts/students_digits.py", *sys.argv[1:]])}
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(res, indent=1, default=float))
    fd = {q["steps"]: q["fd"] for q in report["quality"]}
    print(f"{dest.relative_to(ROOT)}: FD 1-step {fd.get(1, float('nan')):.2f}, 2-step {fd.get(2, float('nan')):.2f} "
          f"(teacher {res['teacher_fd_35nfe']:.2f}); {res['train_seconds']:.0f} s", flush=True)
    return dest


def rescore(labels: list[str], seeds: list[int], teacher: Path, n: int, noise_seeds: list[int]) -> Path:
    """FD at n samples on several noise seeds (`eval --seed S`) for the finished runs `<label>-s<seed>` (1 and 2 steps,
    at their recorded times) and the teacher (Heun 18 steps): at n = 1000 the FD's bias pulls ratios towards 1 and one
    noise seed moves all students together (sixth session).  Reports under runs/n<n>/, results merged into
    docs/results/students/digits/rescore-n<n>.json (finished evals are read back, never recomputed)."""
    dest = OUT.parent / f"digits-rescore-n{n}.json"
    res = json.loads(dest.read_text()) if dest.exists() else {"n": n, "teacher": teacher.name, "fd": {}}
    base = ROOT / "runs" / f"n{n}"

    def one(ckpt: Path, key: str, steps: str, seed: int) -> None:
        out = base / f"{key}-seed{seed}"
        if not (out / "report.json").exists():
            _cli("eval", "--ckpt", str(ckpt), "--n", str(n), "--seed", str(seed), "--steps", steps, "--out", str(out),
                 "--no-progress")
        rep = json.loads((out / "report.json").read_text())
        res["fd"].setdefault(key, {})[str(seed)] = {str(q["steps"]): q["fd"] for q in rep["quality"]}

    for seed in noise_seeds:
        one(teacher, "teacher", "18", seed)
        for label in labels:
            for s in seeds:
                run = RUNS / run_name(label, s)
                if (run / "wall_seconds.txt").exists():  # finished
                    one(run, run.name, "1,2", seed)
    dest.write_text(json.dumps(res, indent=1))
    return dest


def rescore_table(n: int) -> str:
    """Per label: its runs' mean FD over the teacher's on each noise seed, and the mean +- sd over noise seeds."""
    res = json.loads((OUT.parent / f"digits-rescore-n{n}.json").read_text())
    teacher = res["fd"]["teacher"]
    labels = sorted({k.rsplit("-s", 1)[0] for k in res["fd"] if k != "teacher"})
    lines = [f"| student (n = {n}) | runs | noise seeds | 1-step / teacher | 2-step / teacher |", "|---|---|---|---|---|"]
    for label in labels:
        keys = [k for k in res["fd"] if k.rsplit("-s", 1)[0] == label]
        seeds = sorted(set.intersection(*(set(res["fd"][k]) for k in keys)) & set(teacher), key=int)
        cols = []
        for steps in ("1", "2"):
            per_seed = [statistics.mean(res["fd"][k][sd][steps] for k in keys) / teacher[sd]["18"] for sd in seeds]
            cols.append(f"{', '.join(f'{v:.2f}' for v in per_seed)} (**{_ms(per_seed)}**)")
        lines.append(f"| {label} | {len(keys)} | {', '.join(seeds)} | {cols[0]} | {cols[1]} |")
    return "\n".join(lines)


def _ms(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def summary() -> str:
    by: dict[str, list[dict[str, Any]]] = {}
    for f in sorted(OUT.glob("*.json")):
        r = json.loads(f.read_text())
        by.setdefault(run_label(r["recipe"], r["steps"]), []).append(r)
    lines = ["| recipe | seeds | teacher FD (35 NFE) | 1-step FD | 2-step FD | 1-step / teacher | 2-step / teacher | "
             "t_mid | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, rs in sorted(by.items()):
        fd = {k: [next(q["fd"] for q in r["quality"] if q["steps"] == k) for r in rs] for k in (1, 2)}
        ratio = {k: [v / r["teacher_fd_35nfe"] for v, r in zip(fd[k], rs, strict=True)] for k in (1, 2)}
        base = rs[0].get("continues")
        name = f"{name} (from {base['run'].rsplit('-s', 1)[0]})" if base else name
        lines.append(f"| {name} | {len(rs)} | {_ms([r['teacher_fd_35nfe'] for r in rs])} | {_ms(fd[1])} | "
                     f"{_ms(fd[2])} | {_ms(ratio[1])} | {_ms(ratio[2])} | "
                     f"{', '.join(format(r['times']['2'][1], '.2f') for r in rs)} | "
                     f"{_ms([r['train_seconds'] for r in rs])} |")
    return "\n".join(lines)


def plot() -> Path:
    """docs/results/students/digits-fd-vs-compute.png: 1- and 2-step FD, as a ratio to the run's own teacher's 35-NFE FD
    (teachers retrained on another machine differ), against training steps and wall time. A run with a
    curve draws it (its checkpoints, the last one at its swept t_mid); runs scored before the curves (default-length
    runs until the fifth session) are one point each. One colour per recipe; the targets (1.25x, 1.05x) are dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(f.read_text()) for f in sorted(OUT.glob("*.json"))]
    labels = sorted({run_label(r["recipe"], r["steps"]) for r in runs})
    cmap = plt.get_cmap("tab20")
    colour = {lab: cmap(i % 20) for i, lab in enumerate(labels)}

    def batch_ratio(r: dict[str, Any]) -> float:  # steps are drawn in batch-64 steps (samples / 64)
        sets = dict(o.split("=", 1) for o in r.get("overrides", []))
        return int(sets.get("batch_size", 64)) / 64

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, k in enumerate((1, 2)):
        for row, xkey in enumerate(("step", "train_seconds")):
            ax = axes[row, col]
            seen: set[str] = set()
            for r in runs:
                label = run_label(r["recipe"], r["steps"])
                final = {"step": r["steps"], "train_seconds": r["train_seconds"],
                         f"fd_{k}": next(q["fd"] for q in r["quality"] if q["steps"] == k)}
                base = r.get("continues") or {}  # a continuation is drawn after the run it continues
                x0 = base.get("steps" if xkey == "step" else xkey, 0.0)
                scale = batch_ratio(r) if xkey == "step" else 1.0
                pts = [(x0 + scale * c[xkey], c[f"fd_{k}"] / r["teacher_fd_35nfe"])
                       for c in [*(r.get("fd_curve") or []), final]]
                ax.plot(*zip(*pts, strict=True), marker="o", ms=4, lw=1.2 if len(pts) > 1 else 0, color=colour[label],
                        label=None if label in seen else label)
                seen.add(label)
            ratio = 1.25 if k == 1 else 1.05
            ax.axhline(1.0, color="k", ls="--", lw=1, label="teacher, Heun 35 NFE")
            ax.axhline(ratio, color="g", ls=":", lw=1, label=f"target: {ratio}x the teacher")
            ax.set_xlabel("student training samples / 64 (= steps at batch 64)" if xkey == "step"
                          else "training wall time (s, 1 thread, shared 2-core CPU)")
            ax.set_ylabel("FD / teacher's FD (train split, n = 1000)")
            ax.set_ylim(0.9, 2.5)  # early checkpoints (CD and sCT at step 200: 3-29x) are off the chart
            ax.set_title(f"{k}-step sampler (ratios above 2.5x off the chart)", fontsize=10)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("digits consistency students from a digits-stf teacher: FD against training compute")
    fig.tight_layout()
    path = OUT.parent / "digits-fd-vs-compute.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, default=ROOT / "runs" / "bundle-teacher")
    p.add_argument("--recipes", default="scd-noaw")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--summary", action="store_true")
    p.add_argument("--plots", action="store_true", help="write docs/results/students/digits-fd-vs-compute.png")
    p.add_argument("--rescore", type=int, default=0, metavar="N",
                   help="re-score the finished runs of --recipes (at --steps) and the teacher at N samples on each of "
                        "--noise-seeds, then print the ratios")
    p.add_argument("--noise-seeds", default="0,1,2,3")
    a = p.parse_args()
    if a.summary:
        print(summary())
        return 0
    if a.plots:
        print(plot().relative_to(ROOT))
        return 0
    for name in a.recipes.split(","):
        if name not in RECIPES:
            raise SystemExit(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.rescore:
        labels = [run_label(name, a.steps) for name in a.recipes.split(",")]
        rescore(labels, seeds, a.teacher.resolve(), a.rescore, [int(s) for s in a.noise_seeds.split(",")])
        print(rescore_table(a.rescore))
        return 0
    for seed in seeds:
        for name in a.recipes.split(","):
            run_one(name, seed, a.teacher.resolve(), a.steps, a.n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
