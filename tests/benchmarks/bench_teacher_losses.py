"""Cost of one training step of each teacher objective relative to plain DSM (same batch, same network).

    .venv/bin/python tests/benchmarks/bench_teacher_losses.py [--device cpu|cuda] [--steps 5] [--threads N]

Runs the real Trainer.train_step (forward, backward, optimizer, EMA) on gmm2d (MLP, batch 256) and digits
(the preset UNet, batch 64), with each regulariser on the full batch every step (batch_fraction 1, every 1)
and, for the presets' cost controls, at batch_fraction 0.25.  Not collected by pytest.
"""

from __future__ import annotations

import argparse
import time

import torch
from quickstep.train.config import load_preset
from quickstep.train.loop import Trainer

VARIANTS = {
    "dsm": {"diffusion": {}},
    "stf": {"stf": {"ref_batch": 1024}},
    "cp": {"diffusion": {}, "cp": {}},
    "fp": {"diffusion": {}, "fp": {}},
    "cp+fp+stf": {"stf": {"ref_batch": 1024}, "cp": {}, "fp": {}},
    "cp@0.25": {"diffusion": {}, "cp": {"batch_fraction": 0.25}},
    "fp@0.25": {"diffusion": {}, "fp": {"batch_fraction": 0.25}},
    "all@0.25": {"stf": {"ref_batch": 1024}, "cp": {"batch_fraction": 0.25}, "fp": {"batch_fraction": 0.25}},
}


def step_time(preset: str, objectives: dict, device: str, steps: int, batch: int) -> float:
    sets = [f"device={device}", f"batch_size={batch}", "log.tensorboard=false", "log.progress=false",
            "objectives.diffusion=none", "objectives.stf=none", "objectives.cp=none", "objectives.fp=none"]
    for name, table in objectives.items():
        sets.append(f"objectives.{name}.weight={1.0 if name in ('diffusion', 'stf') else 0.01}")
        sets += [f"objectives.{name}.{k}={v}" for k, v in table.items()]
    tr = Trainer(load_preset(preset, sets), "/tmp/quickstep-bench")
    tr.train_step()  # warm-up
    if tr.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        tr.train_step()
    if tr.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = leave)")
    ap.add_argument("--only", choices=("gmm2d", "digits"), default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    for preset, batch in (("gmm2d-plain", 256), ("digits-plain", 64)):
        if a.only and not preset.startswith(a.only):
            continue
        times = {k: step_time(preset, v, a.device, a.steps, batch) for k, v in VARIANTS.items()}
        base = times["dsm"]
        print(f"{preset} batch {batch} on {a.device}: DSM step {base * 1000:.1f} ms")
        for k, t in times.items():
            print(f"  {k:10s} {t * 1000:8.1f} ms   x{t / base:5.2f}")


if __name__ == "__main__":
    main()
