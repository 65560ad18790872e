"""Training benchmark (issue 13, item 3): images/s of one optimisation step of each objective -- DSM, DSM+CP,
DSM+FP, STF, STF+CP+FP, sCT, sCD -- and the JVP/forward ratio, on the same network and batch.

Each step is the real objective (train/losses, via the registry) + backward + Adam, timed round-robin (one call
of every variant per round, median over rounds) so load changes hit all variants alike.  On CUDA the forward
runs under bf16 autocast (the sCM JVP stays fp32, as in training); on a CPU fp32 with --threads (default 1) and
process CPU time as the clock (robust when other jobs share the cores; --clock wall to change).
The JVP rows compare the three JVP methods of train/losses/scm.py: torch.func.jvp ("autograd"), dual numbers
with hand-written conv/GroupNorm tangents ("forward_ad", the default) and the finite difference; sCT/sCD are
timed with each exact method (before/after of the forward_ad change).  Not collected by pytest.

    .venv/bin/python tests/benchmarks/bench_training.py --model digits --batch 64 --iters 5
    .venv/bin/python tests/benchmarks/bench_training.py --model cifar --batch 256 --device cuda   # GPU table
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from quickstep.train.core import build_model
from quickstep.train.losses.base import Batch, StepContext, build_objective, get_objective_spec
from quickstep.train.losses.scm import trigflow_jvp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.benchmarks.bench_generation import MODELS  # noqa: E402 - the same networks as the generation tables

# variant -> {objective name: config overrides}; weights as in the presets (regularisers small)
VARIANTS: dict[str, dict[str, dict]] = {
    "DSM": {"diffusion": {}},
    "DSM+CP": {"diffusion": {}, "cp": {}},
    "DSM+FP": {"diffusion": {}, "fp": {}},
    "STF": {"stf": {}},
    "STF+CP+FP": {"stf": {}, "cp": {}, "fp": {}},
    # the presets' cost control (digits-all): regularisers on the first quarter of the batch
    "DSM+CP@1/4": {"diffusion": {}, "cp": {"batch_fraction": 0.25}},
    "DSM+FP@1/4": {"diffusion": {}, "fp": {"batch_fraction": 0.25}},
    "STF+CP+FP@1/4": {"stf": {}, "cp": {"batch_fraction": 0.25}, "fp": {"batch_fraction": 0.25}},
    "sCT": {"sct": {}},
    "sCD": {"scd": {}},
    "sCT [jvp=autograd]": {"sct": {"jvp": "autograd"}},
    "sCD [jvp=autograd]": {"scd": {"jvp": "autograd"}},
    "sCT [jvp=finite_difference]": {"sct": {"jvp": "finite_difference"}},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(fns: dict[str, Callable[[], object]], iters: int, device: torch.device, clock: Callable[[], float],
                warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, one call of each per round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="digits")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of variant names")
    ap.add_argument("--stf-ref-batch", type=int, default=1024)
    ap.add_argument("--no-jvp", action="store_true", help="skip the JVP/forward table")
    ap.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto", help="auto = on for CUDA")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    use_cpu_clock = a.clock == "cpu" or (a.clock == "auto" and device.type == "cpu" and a.threads == 1)
    clock = time.process_time if use_cpu_clock else time.perf_counter
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    amp = device.type == "cuda"
    cfg = MODELS[a.model]
    torch.manual_seed(0)
    from tests.helpers import perturb_zero_init

    student = perturb_zero_init(build_model(cfg)).to(device).train()
    teacher = perturb_zero_init(build_model(cfg), seed=1).to(device).eval().requires_grad_(False)
    # the trainer's CUDA defaults (issue 21): channels_last, fused Adam, TF32
    cl = a.channels_last == "on" or (a.channels_last == "auto" and amp)
    if cl:
        student.set_channels_last(True)
        teacher.set_channels_last(True)
    if amp:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    opt = torch.optim.Adam(student.parameters(), lr=1e-5, fused=amp)
    g = torch.Generator().manual_seed(0)
    shape = (a.batch, *cfg.sample_shape)
    x = torch.randn(shape, generator=g).clamp(-1, 1).to(device)
    y = torch.randint(0, cfg.num_classes, (a.batch,), generator=g).to(device) if cfg.num_classes else None
    batch = Batch(x, y)
    refs_x = torch.cat([x, torch.randn((max(a.stf_ref_batch - a.batch, 0), *cfg.sample_shape), generator=g)
                        .clamp(-1, 1).to(device)])
    refs_y = (torch.cat([y, torch.randint(0, cfg.num_classes, (refs_x.shape[0] - a.batch,), generator=g).to(device)])
              if y is not None else None)

    def references(n: int) -> Batch:
        n = max(n, a.batch)
        return Batch(refs_x[:n], refs_y[:n] if refs_y is not None else None)

    gen = torch.Generator(device=device).manual_seed(0)
    step_counter = [0]

    def make_step(objectives: dict[str, dict]) -> Callable[[], None]:
        objs = []
        for name, over in objectives.items():
            spec = get_objective_spec(name)
            objs.append(build_objective(name, spec.config_cls(**over)))

        def step() -> None:
            step_counter[0] += 1
            ctx = StepContext(step=500 + step_counter[0], total_steps=1000, generator=gen, device=device,
                              teacher=teacher, references=references, global_batch=batch)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                terms = {}
                for o in objs:
                    terms.update(o(student, batch, ctx))
            loss = sum(v.float() for v in terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    names = [v for v in a.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    n_params = sum(p.numel() for p in student.parameters())
    print(f"# bench_training {time.strftime('%Y-%m-%d %H:%M')} | torch {torch.__version__} | "
          f"{torch.cuda.get_device_name(device) if amp else f'CPU x{os.cpu_count()}'} | model {a.model} "
          f"({n_params / 1e6:.2f}M params) | batch {a.batch} | threads {torch.get_num_threads()} | "
          f"{'bf16 autocast, TF32, fused Adam' if amp else 'fp32'}{', channels_last' if cl else ''} | clock {'process CPU time' if use_cpu_clock else 'wall'} | "
          f"load average {os.getloadavg()[0]:.1f}")
    result: dict[str, dict] = {}
    if not a.no_jvp:
        t = (torch.rand(a.batch, generator=g) * 1.5 + 0.03).to(device)
        v = torch.randn(shape, generator=g).to(device)

        def forward() -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                student(x, t, y)

        def forward_fp32() -> None:
            with torch.no_grad():
                student(x, t, y)

        def fwd_bwd() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = student(x, t, y)
            out.float().square().mean().backward()

        jvp = {"forward (no grad)": forward, "forward fp32 (no grad)": forward_fp32, "forward + backward": fwd_bwd}
        for m in ("autograd", "forward_ad", "finite_difference"):
            jvp[f"JVP {m} (fp32)"] = lambda m=m: trigflow_jvp(student, x, t, v, y, method=m)
        if not amp:
            del jvp["forward fp32 (no grad)"]
        res = round_robin(jvp, a.iters, device, clock)
        base = res.get("forward fp32 (no grad)", res["forward (no grad)"])
        print("\n| call | ms | x fp32 forward |\n|---|---:|---:|")
        for k, s in res.items():
            print(f"| {k} | {1e3 * s:.1f} | {s / base:.2f} |")
        result["jvp"] = {k: 1e3 * s for k, s in res.items()}
        student.zero_grad(set_to_none=True)
        if a.json:  # partial results survive a time limit on the step table
            a.json.write_text(json.dumps({"model": a.model, "batch": a.batch, "device": str(device),
                                          "channels_last": cl, "amp": amp, **result}, indent=1))
    res = round_robin({k: make_step(VARIANTS[k]) for k in names}, a.iters, device, clock)
    base = res.get("DSM")
    print("\n| objective | step ms | images/s | x DSM step |\n|---|---:|---:|---:|")
    for k, s in res.items():
        ratio = f"{s / base:.2f}" if base else "-"
        print(f"| {k} | {1e3 * s:.1f} | {a.batch / s:.1f} | {ratio} |")
    print(f"\n(load average now {os.getloadavg()[0]:.1f})")
    result["steps"] = {k: 1e3 * s for k, s in res.items()}
    if a.json:
        a.json.write_text(json.dumps({"model": a.model, "batch": a.batch, "device": str(device), "channels_last": cl,
                                      "amp": amp, **result}, indent=1))


if __name__ == "__main__":
    main()
