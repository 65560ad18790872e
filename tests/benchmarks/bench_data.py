"""Data pipeline benchmark (issue 23): prints figures, asserts nothing.

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_data.py [--root /tmp/qs-bench-data] [--n 50000]

On a generated set of N 32x32 RGB PNGs in 10 class folders (made under --root once, never in git):
1. first conversion time (`quickstep-train data`, decode once into the prepared uint8 .npy);
2. start-up to the first training step: `quickstep-train fit --preset images-small --data PREP --steps 1` wall time
   (a fresh process: Python + torch imports included), the data's share (open the prepared set, check its source
   fingerprint, first batch) and the Trainer construction + first batch in a warm process;
3. resident memory for the data after a full epoch of batches (RSS delta) vs the uint8 size;
4. loader throughput (prepared in memory, and PNGs decoded by 2 DataLoader workers) vs what one DSM step of the
   cifar10-teacher network consumes on this machine (images per second at batch 16, extrapolated per image);
5. SIGKILL mid-epoch then --resume: the resumed run's weights equal an uninterrupted run's (same batches).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

CLI = [sys.executable, "-m", "quickstep.train.cli"]
QUIET = ["--set", "log.samples=false", "--set", "log.tensorboard=false", "--set", "log.progress=false"]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def generate(root: Path, n: int) -> float:
    from PIL import Image

    done = root / ".complete"
    if done.is_file() and int(done.read_text()) == n:
        return 0.0
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    per = n // 10
    yy, xx = np.mgrid[0:32, 0:32]
    for c in range(10):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per):
            # smooth class-dependent gradients + noise: compresses like photos, not like pure noise
            base = (np.stack([xx * (c + 1), yy * (10 - c), (xx + yy) * 4], -1) * 2 + rng.integers(0, 48, (32, 32, 3)))
            Image.fromarray((base % 256).astype(np.uint8)).save(d / f"{i:05d}.png")
    done.write_text(str(n))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/qs-bench-data")
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--skip-kill", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(args.root)
    imgs, prep = root / "imgs", root / "prep"
    fig: dict = {"n": args.n, "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()}
    fig["generate_s"] = round(generate(imgs, args.n), 1)

    # 1. first conversion
    from quickstep.train.prepare import convert

    t0 = time.perf_counter()
    meta = convert(imgs, prep, overwrite=True, progress=False)
    fig["convert_s"] = round(time.perf_counter() - t0, 2)
    fig["convert_img_per_s"] = round(args.n / fig["convert_s"])
    uint8_mb = np.prod(meta["shape"]) / 2**20
    fig["uint8_mb"] = round(float(uint8_mb), 1)

    # 2. start-up to the first step (a fresh process, and the trainer's part inside this one)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    r = subprocess.run(CLI + ["fit", "--preset", "images-small", "--data", str(prep), "--out", str(root / "run-startup"),
                              "--steps", "1", "--set", "log.ckpt_every=1000", *QUIET], env=env, capture_output=True,
                       text=True)
    fig["fit_1_step_process_s"] = round(time.perf_counter() - t0, 2)
    assert r.returncode == 0, r.stderr[-2000:]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch; torch.optim.Adam([torch.zeros(1, requires_grad=True)])"],
                   env=env, check=True)
    fig["python_import_torch_and_optim_s"] = round(time.perf_counter() - t0, 2)  # start-up that is not data
    from quickstep.train.config import load_preset
    from quickstep.train.data import load_dataset
    from quickstep.train.loop import Trainer
    from quickstep.train.stream import DataFeed, InfiniteSampler

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo: torch start-up, not data

    t0 = time.perf_counter()  # the data's share: open + source fingerprint check + first batch
    ds = load_dataset("prepared", path=str(prep))
    DataFeed(ds, InfiniteSampler(len(ds), 0), device=torch.device("cpu"), batch_size=64).next()
    fig["data_startup_s"] = round(time.perf_counter() - t0, 3)
    del ds

    t0 = time.perf_counter()
    tr = Trainer(load_preset("images-small", [s for s in QUIET if s != "--set"], data_path=str(prep)),
                 root / "run-startup2")
    fig["trainer_init_s"] = round(time.perf_counter() - t0, 2)
    t1 = time.perf_counter()
    tr.feed.next()
    fig["first_batch_s"] = round(time.perf_counter() - t1, 4)
    fig["startup_to_first_step_s"] = round(time.perf_counter() - t0, 2)
    tr.close()
    del tr

    # 3. resident memory of the data over one epoch of batches (prepared, memory-mapped uint8)
    base = rss_mb()
    ds = load_dataset("prepared", path=str(prep))
    sampler = InfiniteSampler(len(ds), 0)
    feed = DataFeed(ds, sampler, device=torch.device("cpu"), batch_size=512)
    t0 = time.perf_counter()
    for _ in range(len(ds) // 512 + 1):
        feed.next()
    dt = time.perf_counter() - t0
    fig["data_rss_mb"] = round(rss_mb() - base, 1)
    fig["data_rss_over_uint8"] = round(fig["data_rss_mb"] / fig["uint8_mb"], 3)
    fig["loader_prepared_img_per_s"] = round((len(ds) // 512 + 1) * 512 / dt)

    # 4. streamed PNG decoding through 2 DataLoader workers
    from quickstep.train.sources import FileSource

    src = FileSource("folder", imgs)
    feed = DataFeed(src, InfiniteSampler(len(src), 0), device=torch.device("cpu"), batch_size=256, workers=2,
                    prefetch=4)
    feed.next()
    t0 = time.perf_counter()
    k = 20
    for _ in range(k):
        feed.next()
    fig["loader_png_2workers_img_per_s"] = round(k * 256 / (time.perf_counter() - t0))
    feed.close()

    # DSM consumption of the cifar10 preset's network (56M params), batch 16 on this machine
    from quickstep.train.config import model_config
    from quickstep.train.core.model import build_model
    from quickstep.train.data import DataSpec
    from quickstep.train.losses import Batch, StepContext, build_objective

    cfg = load_preset("cifar10-teacher")
    model = build_model(model_config(cfg, DataSpec("image", (3, 32, 32), 10, "bench")))
    obj = build_objective("diffusion", cfg.objectives["diffusion"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    torch.set_num_threads(2)
    b = 16
    x = torch.rand(b, 3, 32, 32) * 2 - 1
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(2):
        t0 = time.perf_counter()
        ctx = StepContext(step=step, total_steps=10, generator=g, device=torch.device("cpu"), rank=0, world_size=1,
                          global_batch=Batch(x, None))
        loss = sum(obj(model, Batch(x, None), ctx).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(1)
    step_s = min(times[1:])
    fig["dsm_cifar10_step_s_at_b16"] = round(step_s, 2)
    fig["dsm_cifar10_img_per_s"] = round(b / step_s, 4)
    fig["loader_prepared_over_dsm"] = round(fig["loader_prepared_img_per_s"] * step_s / b)
    fig["loader_png_over_dsm"] = round(fig["loader_png_2workers_img_per_s"] * step_s / b)

    # 5. SIGKILL mid-epoch, then resume == uninterrupted (streamed PNGs through workers, x-flip on)
    if not args.skip_kill:
        sub = root / "kill-subset"
        if not sub.is_dir():
            for c in range(3):
                (sub / f"class{c}").mkdir(parents=True)
                for i in range(20):
                    os.link(imgs / f"class{c}" / f"{i:05d}.png", sub / f"class{c}" / f"{i:05d}.png")
        zipf = root / "kill.zip"
        if not zipf.is_file():
            import zipfile

            with zipfile.ZipFile(zipf, "w") as z:
                for p in sorted(sub.rglob("*.png")):
                    z.write(p, p.relative_to(sub).as_posix())
        small = ["--preset", "images-small", "--data", str(zipf), "--set", "batch_size=16", "--set",
                 "data.xflip=true", "--set", "log.every=1", "--set", "log.ckpt_every=1", "--set",
                 "model.backbone={model_channels = 8, channel_mult = [1], num_blocks = 1, attn_resolutions = [], "
                 "time_scale = 10.0}", "--set", "log.keep_checkpoints=0", *QUIET]
        steps = 12  # 120 x-flipped indices per epoch, 16 per step: the kill lands mid-epoch
        a, k = root / "kill-a", root / "kill-b"
        for d in (a, k):
            subprocess.run(["rm", "-rf", str(d)])
        subprocess.run(CLI + ["fit", *small, "--out", str(a), "--steps", str(steps)], env=env, check=True,
                       capture_output=True)
        proc = subprocess.Popen(CLI + ["fit", *small, "--out", str(k), "--steps", "100000"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while len(list(k.glob("step-*"))) < 5:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        from quickstep.train.core import checkpoint as ckpt
        from quickstep.train.loop import find_checkpoint

        last = find_checkpoint(k)
        fig["killed_at_sampler"] = ckpt.load_state(last)["sampler"]
        subprocess.run(CLI + ["fit", "--resume", str(k), "--out", str(k), "--steps", str(steps)], env=env, check=True,
                       capture_output=True)
        wa = ckpt.load_model(a / f"step-{steps:07d}", which="raw").state_dict()
        wb = ckpt.load_model(k / f"step-{steps:07d}", which="raw").state_dict()
        fig["resume_after_sigkill_bit_exact"] = all(torch.equal(wa[n], wb[n]) for n in wa)
    fig["load_avg_at_end"] = os.getloadavg()
    print(json.dumps(fig, indent=2))


if __name__ == "__main__":
    main()
