"""Benchmark: cost of an sCT and an sCD step relative to a teacher DSM step, and of a JVP relative to a forward pass.

Not collected by pytest.  Run:
    .venv/bin/python tests/benchmarks/bench_student_losses.py [--model digits|cifar] [--batch 64] [--iters 10]
        [--device cpu|cuda] [--threads N]
Prints one line per measurement and the ratios (the sCM paper reports ~2x a teacher step for sCD).
On CUDA the student forward runs under bf16 autocast (as in training), the JVP in float32.
"""

from __future__ import annotations

import argparse
import time

import torch
from quickstep.train.core import ModelConfig, UNetConfig, build_model
from quickstep.train.losses.base import Batch, StepContext
from quickstep.train.losses.diffusion import DiffusionConfig, DiffusionLoss
from quickstep.train.losses.scm import SCDLoss, SCMConfig, SCTLoss, trigflow_jvp

MODELS = {
    "digits": UNetConfig(img_channels=1, img_resolution=16, model_channels=32, channel_mult=(1, 2), num_blocks=1,
                         attn_resolutions=(8,), num_classes=10),
    "cifar": UNetConfig(img_channels=3, img_resolution=32, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                        attn_resolutions=(16,)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_round_robin(fns: dict, iters: int, device: torch.device, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, measured interleaved (one call of each per round) so that
    load fluctuations on a shared machine hit every measurement alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="digits")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ucfg = MODELS[args.model]
    mcfg = ModelConfig(ucfg)
    torch.manual_seed(0)
    student = build_model(mcfg).to(device).train()
    teacher = build_model(mcfg).to(device).eval().requires_grad_(False)
    with torch.no_grad():  # give the zero-initialised layers some weight so nothing is trivially zero
        for m in (student, teacher):
            for prm in m.parameters():
                if float(prm.abs().max()) == 0.0:
                    prm.normal_(std=0.02)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    shape = (args.batch, ucfg.img_channels, ucfg.img_resolution, ucfg.img_resolution)
    x = torch.randn(shape, device=device).clamp(-1, 1)
    y = torch.randint(0, 10, (args.batch,), device=device) if ucfg.num_classes else None
    batch = Batch(x, y)
    gen = torch.Generator(device=device).manual_seed(0)
    amp = device.type == "cuda"

    def step(objective) -> None:
        ctx = StepContext(step=100, total_steps=1000, generator=gen, device=device, teacher=teacher,
                          global_batch=batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = sum(objective(student, batch, ctx).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    dsm = DiffusionLoss(DiffusionConfig())
    sct, scd = SCTLoss(SCMConfig()), SCDLoss(SCMConfig())
    sct_fd = SCTLoss(SCMConfig(jvp="finite_difference"))
    t = torch.rand(args.batch, device=device) * 1.5 + 0.03
    v = torch.randn(shape, device=device)

    def forward() -> None:
        with torch.no_grad():
            student(x, t, y)

    res = timed_round_robin({
        "forward (no grad, fp32)": forward,
        "jvp torch.func (fp32)": lambda: trigflow_jvp(student, x, t, v, y),
        "jvp finite difference (fp32)": lambda: trigflow_jvp(student, x, t, v, y, method="finite_difference"),
        "teacher DSM step": lambda: step(dsm),
        "sCT step": lambda: step(sct),
        "sCT step (finite-difference JVP)": lambda: step(sct_fd),
        "sCD step": lambda: step(scd),
    }, args.iters, device)
    n_params = sum(p.numel() for p in student.parameters())
    print(f"device={device} model={args.model} ({n_params / 1e6:.2f}M params) batch={args.batch} "
          f"threads={torch.get_num_threads()} amp={'bf16' if amp else 'off'}")
    for k, s in res.items():
        print(f"  {k:34s} {s * 1e3:9.1f} ms")
    fwd, dsm_t = res["forward (no grad, fp32)"], res["teacher DSM step"]
    print(f"  ratio jvp/forward                  {res['jvp torch.func (fp32)'] / fwd:6.2f}x")
    print(f"  ratio fd-jvp/forward               {res['jvp finite difference (fp32)'] / fwd:6.2f}x")
    print(f"  ratio sCT/DSM step                 {res['sCT step'] / dsm_t:6.2f}x")
    print(f"  ratio sCT(fd)/DSM step             {res['sCT step (finite-difference JVP)'] / dsm_t:6.2f}x")
    print(f"  ratio sCD/DSM step                 {res['sCD step'] / dsm_t:6.2f}x   (paper: ~2x)")


if __name__ == "__main__":
    main()
