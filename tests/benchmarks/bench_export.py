"""Export benchmark for a digits-sized model: export times, file sizes, parity errors, and onnxruntime vs torch
eager latency (CPU) at batch 1/8/64 for the 1- and 2-step generators.

    .venv/bin/python tests/benchmarks/bench_export.py [--ckpt DIR] [--aoti] [--repeats 10] [--threads 2]

Without --ckpt it uses random weights for the digits preset (UNet model_channels=32, mult (1, 2), attention at
8x8, 16x16x1, 10 classes); latency does not depend on the weights.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from quickstep.export.bundle import export_bundle, read_manifest
from quickstep.export.onnx import ort_session
from quickstep.train.core.checkpoint import load_model, save_checkpoint
from quickstep.train.core.generator import ConsistencyGenerator
from quickstep.train.core.model import build_model
from quickstep.train.core.networks import ModelConfig, UNetConfig


def digits_checkpoint(root: Path) -> Path:
    """Random-weight digits-sized consistency checkpoint (zero-initialised output layers perturbed)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=UNetConfig(img_channels=1, img_resolution=16, model_channels=32,
                                                        channel_mult=(1, 2), attn_resolutions=(8,), num_classes=10)))
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.05)
    return save_checkpoint(root / "digits-random", model, extra_config={"kind": "consistency", "name": "digits-random"})


def time_ms(fn, repeats: int) -> float:
    """Median wall time of fn() in ms after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--aoti", action="store_true", help="also compile AOTInductor packages (40-90 s each)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = args.ckpt or digits_checkpoint(root)
        model = load_model(ckpt)
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, sample {model.sample_shape}, "
              f"{model.num_classes} classes; torch {torch.__version__}, {args.threads} threads")
        t0 = time.perf_counter()
        bundle = export_bundle(ckpt, root / "bundle", steps=(1, 2))
        total = time.perf_counter() - t0
        m = read_manifest(bundle)
        print(f"export_bundle: {total:.2f} s total (graph exports {m['export_seconds']})")
        for f, meta in m["files"].items():
            print(f"  {f:24s} {meta['bytes'] / 1e6:8.2f} MB")
        for key, e in m["parity"]["onnxruntime"].items():
            errs = ", ".join(f"{k[12:]}={v:.3g}" for k, v in e.items() if k.startswith("max_abs_err_"))
            print(f"  parity onnxruntime[{key}]: {errs} ({e['units']}, tol {e['tolerance']:g})")
        runners = {}
        if args.aoti:
            from quickstep.export.aoti import export_aoti_bundle, load_aoti

            t0 = time.perf_counter()
            res = export_aoti_bundle(bundle, device="cpu", max_batch=max(batches))
            print(f"aoti: {time.perf_counter() - t0:.1f} s; " + "; ".join(
                f"[{k}] export {v['export_s']} s compile {v['compile_s']} s err b7={v['max_abs_err_b7']:g}"
                for k, v in res.items()))
            runners = {int(k): load_aoti(bundle / v["file"]) for k, v in res.items()}
        print(f"\nlatency (median of {args.repeats}, ms)")
        print(f"{'steps':>5} {'batch':>5} {'eager':>9} {'onnxruntime':>12} {'speedup':>8}" + (
            f" {'aoti':>9}" if runners else ""))
        for steps in (1, 2):
            gen = ConsistencyGenerator(model, steps).eval()
            sess = ort_session(bundle / f"generator_{steps}step.onnx", threads=args.threads)
            for b in batches:
                rng = np.random.default_rng(b)
                noise = [rng.standard_normal((b, *model.sample_shape), dtype=np.float32) for _ in range(steps)]
                labels = rng.integers(0, 10, b)
                feeds = {"noise": noise[0], "class_labels": labels}
                if steps == 2:
                    feeds["noise2"] = noise[1]
                targs = [torch.from_numpy(n) for n in noise] + [torch.from_numpy(labels)]

                def eager(gen=gen, targs=targs):
                    with torch.no_grad():
                        return gen(*targs)

                t_eager = time_ms(eager, args.repeats)
                t_ort = time_ms(lambda feeds=feeds, sess=sess: sess.run(None, feeds), args.repeats)
                line = f"{steps:>5} {b:>5} {t_eager:>9.2f} {t_ort:>12.2f} {t_eager / t_ort:>7.2f}x"
                if steps in runners:
                    r = runners[steps]
                    line += f" {time_ms(lambda r=r, targs=targs: r(*targs), args.repeats):>9.2f}"
                print(line)


if __name__ == "__main__":
    main()
