"""Fast-path benchmark (issue 21): fused SDPA vs math attention at every attention resolution the presets use
(forward and forward + backward, one attention layer and the whole preset UNet), channels_last, bfloat16 weights,
and the torch backend's batch-bucket overhead.  Not collected by pytest.

    .venv/bin/python tests/benchmarks/bench_fast_path.py [--threads 1] [--repeats 7] [--json out.json]

Variants are timed round-robin (one call of each per round, median over rounds) with process CPU time on one
thread by default, so load from other jobs on a shared machine hits all variants alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from quickstep.train.core import build_model
from quickstep.train.core.generator import inference_copy
from quickstep.train.core.networks import Attention, attention_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.benchmarks.bench_networks import preset_model  # noqa: E402
from tests.benchmarks.bench_training import round_robin as _round_robin  # noqa: E402

CLOCK: Callable[[], float] = time.process_time


def round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median milliseconds per call of each fn (bench_training's round robin on the CPU clock)."""
    return {k: 1e3 * v for k, v in _round_robin(fns, repeats, torch.device("cpu"), CLOCK, warmup).items()}


def attention_sites(cfg) -> list[tuple[int, int]]:
    """(channels, resolution) of every distinct attention layer of a UNet config."""
    b = cfg.backbone
    model = build_model(cfg).backbone
    sites, res = set(), b.img_resolution
    x = torch.zeros(1, b.img_channels, res, res)
    seen: list[tuple[int, int]] = []

    def hook(mod, inp, out):
        seen.append((int(inp[0].shape[1]), int(inp[0].shape[2])))

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Attention)]
    with torch.no_grad():
        model(x, torch.ones(1), torch.zeros(1, dtype=torch.long) if b.num_classes else None)
    for h in hs:
        h.remove()
    sites.update(seen)
    return sorted(sites, key=lambda s: (s[1], s[0]))


def bench_attention(preset: str, cfg, batch: int, repeats: int) -> list[dict]:
    rows = []
    for ch, res in attention_sites(cfg):
        torch.manual_seed(0)
        layer = Attention(ch, cfg.backbone.num_heads)
        x = torch.randn(batch, ch, res, res)
        xg = x.clone().requires_grad_(True)

        def fwd(kernel: str, layer=layer, x=x):
            def f():
                with torch.no_grad(), attention_kernel(kernel):
                    layer(x)
            return f

        def fwd_bwd(kernel: str, layer=layer, xg=xg):
            def f():
                with attention_kernel(kernel):
                    layer(xg).square().mean().backward()
            return f

        r = round_robin({"sdpa fwd": fwd("sdpa"), "math fwd": fwd("math"), "sdpa fwd+bwd": fwd_bwd("sdpa"),
                         "math fwd+bwd": fwd_bwd("math")}, repeats)
        rows.append({"preset": preset, "site": f"attention {ch}ch {res}x{res} ({res * res} tokens)", "batch": batch,
                     **{k: round(v, 3) for k, v in r.items()}})
    return rows


def bench_model(preset: str, cfg, batch: int, repeats: int) -> dict:
    from tests.helpers import perturb_zero_init

    torch.manual_seed(0)
    model = perturb_zero_init(build_model(cfg)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *cfg.sample_shape, generator=g)
    t = torch.rand(batch, generator=g) + 0.1
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None
    cl = inference_copy(model, channels_last=True)
    bf = inference_copy(model, dtype=torch.bfloat16)
    bfcl = inference_copy(model, dtype=torch.bfloat16, channels_last=True)
    train = copy.deepcopy(model).train()

    def fwd(m, kernel="sdpa"):
        def f():
            with torch.no_grad(), attention_kernel(kernel):
                m(x, t, y)
        return f

    def fwd_bwd(kernel):
        def f():
            with attention_kernel(kernel):
                train(x, t, y).square().mean().backward()
        return f

    r = round_robin({"math fwd": fwd(model, "math"), "sdpa fwd": fwd(model), "sdpa+channels_last fwd": fwd(cl),
                     "sdpa+bf16 weights fwd": fwd(bf), "sdpa+bf16+channels_last fwd": fwd(bfcl),
                     "math fwd+bwd": fwd_bwd("math"), "sdpa fwd+bwd": fwd_bwd("sdpa")}, repeats)
    with torch.no_grad():
        ref = model(x, t, y)
        err = {"bf16 weights max|err|/max|ref|": float((bf(x, t, y) - ref).abs().max() / ref.abs().max()),
               "channels_last max|err|": float((cl(x, t, y) - ref).abs().max())}
    return {"preset": preset, "site": "whole UNet", "batch": batch, **{k: round(v, 3) for k, v in r.items()},
            **{k: float(f"{v:.3g}") for k, v in err.items()}}


def bench_buckets(repeats: int) -> dict:
    """The digits generator through the torch backend at n = 5 rows: unbucketed vs padded to the 8-row bucket, and
    the cost of the padding itself."""
    from quickstep.serve.backends.base import create_backend
    from quickstep.serve.backends.buckets import pad_rows
    from quickstep.serve.bundle import load_bundle
    from quickstep.serve.service import draw_labels, draw_noise
    from quickstep.serve.settings import ServeSettings

    from tests.benchmarks.bench_serve import digits_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        from quickstep.export.bundle import export_bundle

        bundle = export_bundle(digits_checkpoint(Path(tmp)), Path(tmp) / "b", steps=(1,), heun_steps=(),
                               parity_batches=(1,))
        b = load_bundle(bundle)
        be = {k: create_backend(b, ServeSettings(backend="torch", device="cpu", max_batch=32, batch_buckets=k))
              for k in ("off", "on")}
        for x in be.values():
            x.load()
        out = {}
        for n in (5, 17):
            noises = draw_noise(0, n, b.image_shape, 1)
            labels = draw_labels(0, n, b.num_classes, 1, b.image_shape)
            r = round_robin({k: (lambda x=x, nz=noises, lb=labels: x.run(1, nz, lb)) for k, x in be.items()}, repeats)
            pad = round_robin({"pad": lambda nz=noises, lb=labels: (pad_rows(nz[0], 32), pad_rows(lb, 32))}, 50)["pad"]
            out[f"n={n}"] = {"unbucketed ms": round(r["off"], 3), "bucketed ms": round(r["on"], 3),
                             "bucket rows": 8 if n == 5 else 32, "padding copy ms": round(pad, 4)}
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--presets", default="digits-stf,cifar10-teacher")
    ap.add_argument("--batches", default="digits-stf=64,cifar10-teacher=8", help="preset=batch,...")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--no-buckets", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    torch.set_num_threads(a.threads)
    batches = dict(kv.split("=") for kv in a.batches.split(","))
    print(f"# bench_fast_path {time.strftime('%Y-%m-%d %H:%M')} | torch {torch.__version__} | CPU x{os.cpu_count()} | "
          f"threads {torch.get_num_threads()} | clock {'process CPU time' if a.clock == 'cpu' else 'wall'} | "
          f"median of {a.repeats} round-robin | load average {os.getloadavg()[0]:.1f}")
    rows = []
    for preset in a.presets.split(","):
        cfg = preset_model(preset)
        batch = int(batches.get(preset, 8))
        rows += bench_attention(preset, cfg, batch, a.repeats)
        rows.append(bench_model(preset, cfg, batch, a.repeats))
    for r in rows:
        print(json.dumps(r))
    print("\n| preset | site | batch | math fwd ms | SDPA fwd ms | SDPA/math | math fwd+bwd ms | SDPA fwd+bwd ms "
          "| SDPA/math |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['site']} | {r['batch']} | {r['math fwd']:.2f} | {r['sdpa fwd']:.2f} | "
              f"{r['sdpa fwd'] / r['math fwd']:.2f} | {r['math fwd+bwd']:.2f} | {r['sdpa fwd+bwd']:.2f} | "
              f"{r['sdpa fwd+bwd'] / r['math fwd+bwd']:.2f} |")
    print("\n| preset | batch | SDPA fwd ms | + channels_last | + bf16 weights | bf16 + channels_last | bf16 rel. err |"
          "\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["site"] == "whole UNet":
            print(f"| {r['preset']} | {r['batch']} | {r['sdpa fwd']:.2f} | {r['sdpa+channels_last fwd']:.2f} | "
                  f"{r['sdpa+bf16 weights fwd']:.2f} | {r['sdpa+bf16+channels_last fwd']:.2f} | "
                  f"{r['bf16 weights max|err|/max|ref|']:.3g} |")
    result = {"rows": rows}
    if not a.no_buckets:
        result["buckets"] = bench_buckets(a.repeats)
        print("\nbucket overhead (digits generator, torch backend, 1 step):", json.dumps(result["buckets"]))
    print(f"(load average now {os.getloadavg()[0]:.1f})")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
