"""Parameters and CPU forward latency of the UNet presets (not collected by pytest: bench_*.py).

Run: .venv/bin/python tests/benchmarks/bench_networks.py [--repeats 10] [--threads N] [--jvp] [--cpu-time]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from quickstep.train.core import ModelConfig, build_model
from quickstep.train.core.networks import exact_autodiff

# the data each preset family trains on: (shape, classes), so a preset's [model] section builds without the data
DATA_SHAPES = {"digits": ((1, 16, 16), 10), "cifar10": ((3, 32, 32), 10), "gmm2d": ((2,), 0)}


def preset_model(name: str) -> ModelConfig:
    """The ModelConfig that `quickstep-train fit --preset NAME` builds (the shipped TOML's [model] section)."""
    from types import SimpleNamespace

    from quickstep.train.config import load_preset, model_config

    cfg = load_preset(name)
    shape, classes = DATA_SHAPES[name.split("-")[0]]
    spec = SimpleNamespace(kind="image" if len(shape) == 3 else "vector", shape=shape, num_classes=classes, name=name)
    return model_config(cfg, spec)


PRESETS = ("digits-stf", "cifar10-teacher")  # every digits-* / cifar10-* preset shares its family's UNet


def time_call(fn, repeats: int) -> float:
    """Median wall time of fn() in milliseconds, after two warm-up calls (CPU time with --cpu-time)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        times.append((CLOCK() - t0) * 1e3)
    return statistics.median(times)


CLOCK = time.perf_counter


def forward_ms(model, cfg: ModelConfig, batch: int, repeats: int, g: torch.Generator) -> float:
    x = torch.randn(batch, *cfg.sample_shape, generator=g)
    t = torch.full((batch,), 1.0)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None
    with torch.no_grad():
        return time_call(lambda: model(x, t, y), repeats)


def jvp_ms(model, cfg: ModelConfig, batch: int, repeats: int, g: torch.Generator) -> float:
    x, t = torch.randn(batch, *cfg.sample_shape, generator=g), torch.full((batch,), 1.0)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None
    tangents = (torch.ones_like(x), torch.ones_like(t))
    with torch.no_grad(), exact_autodiff():  # the math attention kernel: fused SDPA has no forward-mode AD
        return time_call(lambda: torch.func.jvp(lambda a, b: model(a, b, y), (x, t), tangents), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated shipped preset names")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--jvp", action="store_true", help="also time torch.func.jvp at batch 64")
    ap.add_argument("--cpu-time", action="store_true",
                    help="report process CPU time instead of wall time (robust on a shared, loaded machine)")
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    clock = "process CPU time" if args.cpu_time else "wall time"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, eval, no_grad, median {clock}")
    print(f"{'preset':<16} {'params':>11} {'backbone':>10} {'b1 ms':>8} {'b64 ms':>8} {'img/s@64':>9}"
          + (f" {'jvp64 ms':>9}" if args.jvp else ""))
    for name in args.presets.split(","):
        cfg = preset_model(name)
        model = build_model(cfg).eval()
        n_all = sum(p.numel() for p in model.parameters())
        n_bb = sum(p.numel() for p in model.backbone.parameters())
        b1, b64 = (forward_ms(model, cfg, b, args.repeats, g) for b in (1, 64))
        line = f"{name:<16} {n_all:>11,} {n_bb:>10,} {b1:>8.2f} {b64:>8.2f} {64e3 / b64:>9.0f}"
        if args.jvp:
            line += f" {jvp_ms(model, cfg, 64, max(3, args.repeats // 3), g):>9.1f}"
        print(line)


if __name__ == "__main__":
    main()
