"""The trainer: learning on gmm2d with every regulariser, exact resume, 2-process DDP, the NaN guard."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from quickstep.train.config import ConfigError, TrainConfig, build_config
from quickstep.train.core import checkpoint as ckpt
from quickstep.train.data import gmm_preset
from quickstep.train.loop import (
    RESUME_GAP_S,
    NonFiniteLossError,
    Trainer,
    config_from_checkpoint,
    ema_beta,
    learning_rate,
    read_train_log,
    resume_gaps,
    training_seconds,
)
from quickstep.train.losses import register_objective

pytestmark = pytest.mark.usefixtures("one_thread")


QUIET = {"every": 1, "ckpt_every": 1000, "tensorboard": False, "progress": False, "samples": False}


def tiny_config(objectives: dict, **over) -> TrainConfig:
    d = {"steps": 10, "batch_size": 64, "seed": 0, "device": "cpu",
         "data": {"name": "gmm", "options": {"preset": "ring8", "n": 4000}},
         "model": {"kind": "mlp", "logvar_channels": 32, "backbone": {"hidden": 64, "depth": 2, "emb_channels": 32}},
         "optim": {"lr": 3e-3, "betas": [0.9, 0.99], "warmup_steps": 20, "grad_clip": 1.0},
         "ema": {"halflife_kimg": 2.0}, "log": dict(QUIET), "objectives": objectives}
    for k, v in over.items():
        if isinstance(v, dict):
            d[k] = {**d.get(k, {}), **v}
        else:
            d[k] = v
    return build_config(d)


def score_error(model, n: int = 2000) -> float:
    """E ||sigma (s_theta - s*)||^2 over data noised at a grid of sigmas (the exact GMM score as ground truth)."""
    mix = gmm_preset("ring8")
    g = torch.Generator().manual_seed(123)
    errs = []
    with torch.no_grad():
        for sigma in (0.05, 0.2, 0.5, 1.0, 2.0):
            x = mix.sample(n, g) + sigma * torch.randn(n, 2, generator=g)
            s = torch.full((n,), sigma)
            diff = model.edm_score(x, s) - mix.score(x, s).float()
            errs.append((sigma * diff).square().sum(1).mean().item())
    return sum(errs) / len(errs)


# ----------------------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("objectives", [
    {"diffusion": {}},
    {"diffusion": {}, "cp": {"weight": 2.0, "batch_fraction": 0.25}},
    {"diffusion": {}, "fp": {"weight": 0.003, "batch_fraction": 0.25}},
    {"stf": {"ref_batch": 1024}},
], ids=["plain", "cp", "fp", "stf"])
def test_training_lowers_the_exact_score_error(objectives, tmp_path):
    cfg = tiny_config(objectives, steps=150, batch_size=256)
    tr = Trainer(cfg, tmp_path)
    before = score_error(tr.model)
    res = tr.fit()
    after = score_error(tr.model)
    assert all(math.isfinite(v) for v in res.losses)
    assert after < (0.85 if "fp" in objectives else 0.6) * before, (before, after)


# ----------------------------------------------------------------------------------------------- resume
def test_resume_continues_bit_for_bit(tmp_path):
    objectives = {"stf": {"ref_batch": 256, "label_dropout": 0.2}, "cp": {"chain_steps": 2},
                  "fp": {"batch_fraction": 0.25, "every": 2}}
    cfg = tiny_config(objectives, steps=8, log={"ckpt_every": 4, "keep_checkpoints": 0},
                      data={"options": {"preset": "ring8", "n": 100, "conditional": True}})  # epochs wrap
    a = Trainer(cfg, tmp_path / "a")
    full = a.fit()
    mid = tmp_path / "a" / "step-0000004"
    assert config_from_checkpoint(mid) == cfg
    b = Trainer(config_from_checkpoint(mid), tmp_path / "b", resume=mid)
    assert b.step == 4
    rest = b.fit()
    assert rest.losses == full.losses[4:]
    for pa, pb in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    for pa, pb in zip(a.ema.state_dict().values(), b.ema.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)


def test_checkpoint_holds_config_ema_and_state(tmp_path):
    cfg = tiny_config({"diffusion": {}}, steps=3)
    res = Trainer(cfg, tmp_path).fit()
    assert res.checkpoint == tmp_path / "step-0000003"
    meta = ckpt.load_config(res.checkpoint)
    assert meta["train"] == json.loads(json.dumps(cfg.to_dict())) and meta["step"] == 3
    assert meta["data"]["shape"] == [2]
    state = ckpt.load_state(res.checkpoint)
    assert state["step"] == 3 and "optimizer" in state and "noise" in state["rng"]
    ema, raw = ckpt.load_model(res.checkpoint), ckpt.load_model(res.checkpoint, which="raw")
    assert any(not torch.equal(p, q) for p, q in zip(ema.parameters(), raw.parameters(), strict=True))
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 3


# ----------------------------------------------------------------------------------------------- guard
@dataclass(frozen=True)
class _NaNConfig:
    weight: float = 1.0
    at_step: int = 2


@register_objective("test_nan_injector", _NaNConfig)
class _NaNInjector:
    """Returns NaN at one step (tests the guard)."""

    def __init__(self, config):
        self.config = config

    def __call__(self, model, batch, ctx):
        bad = ctx.step == self.config.at_step
        return {"injected": model.logvar(torch.zeros(1)).sum() * 0 + (float("nan") if bad else 0.0)}


def test_nan_guard_names_the_step_and_the_term(tmp_path):
    cfg = tiny_config({"diffusion": {}, "test_nan_injector": {"at_step": 2}}, steps=5)
    tr = Trainer(cfg, tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"step 2: loss term 'injected' is nan"):
        tr.fit()
    assert tr.step == 2  # no update was applied with the bad loss


def test_ema_and_warmup_schedules():
    cfg = tiny_config({"diffusion": {}}, batch_size=100, ema={"halflife_kimg": 1.0, "rampup_ratio": None},
                      optim={"lr": 1.0, "warmup_steps": 10})
    assert ema_beta(cfg, 10_000) == pytest.approx(0.5 ** (100 / 1000))
    assert learning_rate(cfg, 0) == pytest.approx(0.1) and learning_rate(cfg, 50) == 1.0


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_lr_decay_runs_from_lr_after_warmup_to_the_final_ratio_at_the_last_step(decay):
    cfg = tiny_config({"diffusion": {}}, steps=101,
                      optim={"lr": 2.0, "warmup_steps": 10, "decay": decay, "final_lr_ratio": 0.1})
    lrs = [learning_rate(cfg, s) for s in range(cfg.steps)]
    assert lrs[9] == pytest.approx(2.0) and lrs[10] == pytest.approx(2.0)  # the decay starts where the warm-up ends
    assert lrs[-1] == pytest.approx(0.2)  # the last step runs at final_lr_ratio * lr
    assert all(a >= b for a, b in zip(lrs[9:-1], lrs[10:], strict=True))  # non-increasing after the warm-up
    mid = learning_rate(cfg, 55)  # half-way through the decay: both shapes are at the midpoint of lr and the floor
    assert mid == pytest.approx(1.1)


def test_inverse_sqrt_decay_is_edm2s():
    cfg = tiny_config({"diffusion": {}}, steps=10_000, optim={"lr": 1.0, "decay": "inverse_sqrt",
                                                               "decay_ref_steps": 100})
    assert learning_rate(cfg, 50) == 1.0 and learning_rate(cfg, 100) == 1.0
    assert learning_rate(cfg, 400) == pytest.approx(0.5) and learning_rate(cfg, 10_000) == pytest.approx(0.1)


def test_training_seconds_leave_out_the_time_a_resumed_run_lay_stopped(tmp_path):
    times = [100.0, 110.0, 125.0, 125.0 + RESUME_GAP_S + 1.0, 125.0 + RESUME_GAP_S + 21.0]  # stopped after row 3
    rows = [{"step": 50 * (i + 1), "time": t} for i, t in enumerate(times)]
    assert training_seconds(rows) == [0.0, 10.0, 25.0, 25.0, 45.0]
    assert training_seconds(rows[:1]) == [0.0] and training_seconds([]) == []
    assert resume_gaps(rows) == [RESUME_GAP_S + 1.0] and resume_gaps(rows[:3]) == [] and resume_gaps([]) == []
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in [*rows[:2], {"note": "no step"}]) + "\n\n")
    assert read_train_log(tmp_path) == rows[:2]
    with pytest.raises(FileNotFoundError, match="not a training run directory"):
        read_train_log(tmp_path / "missing")


def test_lr_decay_rejects_unknown_schedules_and_ratios_with_the_allowed_values():
    with pytest.raises(ConfigError, match=r"optim.decay.*cosine"):
        tiny_config({"diffusion": {}}, optim={"decay": "step"})
    with pytest.raises(ConfigError, match=r"optim.final_lr_ratio"):
        tiny_config({"diffusion": {}}, optim={"final_lr_ratio": 1.5})


# ----------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_SETS = ["steps=3", "batch_size=32", "device=cpu", "log.every=1", "log.tensorboard=false",
            "log.progress=false", "log.samples=false", "model.backbone={hidden = 32, depth = 2, emb_channels = 16}",
            "data.options={preset = \"ring8\", n = 500}", "objectives.cp.chain_steps=2", "objectives.fp.weight=0.003",
            "objectives.stf.ref_batch=128"]


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


def test_two_process_ddp_matches_one_process(tmp_path):
    from quickstep.train.cli import main

    assert main(["fit", "--preset", "gmm2d-all", "--out", str(tmp_path / "one"), *sum((["--set", s] for s in DDP_SETS), [])]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "quickstep.train.cli", "fit",
           "--preset", "gmm2d-all", "--out", str(tmp_path / "two"), *sum((["--set", s] for s in DDP_SETS), [])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ckpt.load_state(tmp_path / "two" / "step-0000003")["world_size"] == 2
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert len(one) == len(two) == 3
    for r1, r2 in zip(one, two, strict=True):
        for k in ("loss", "stf", "cp", "fp", "grad_norm"):
            assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-6), (k, r1[k], r2[k])
    m1 = ckpt.load_model(tmp_path / "one" / "step-0000003", which="raw")
    m2 = ckpt.load_model(tmp_path / "two" / "step-0000003", which="raw")
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_process_ddp_streamed_matches_one_process(tmp_path):
    """[issue 23] A streamed source (EDM zip through DataLoader workers, x-flip): each rank loads only its rows of
    every global batch and the global batch is all-gathered (STF references need it); same losses as one process."""
    from quickstep.train.cli import main

    from tests.train.test_pipeline import make_edm_zip

    make_edm_zip(tmp_path / "set.zip", n=20, names=["a", "b", "c"])
    sets = ["steps=3", "batch_size=8", "device=cpu", "log.every=1", "log.tensorboard=false", "log.progress=false",
            "log.samples=false", "data.resolution=8", "data.xflip=true", "data.workers=1",
            "model.backbone={model_channels = 8, channel_mult = [1], num_blocks = 1, attn_resolutions = [], "
            "time_scale = 10.0}", "objectives.stf={ref_batch = 12}", "objectives.diffusion=none"]
    args = ["fit", "--preset", "images-small", "--data", str(tmp_path / "set.zip"), *sum((["--set", s] for s in sets), [])]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "quickstep.train.cli", *args,
           "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert len(one) == len(two) == 3
    for r1, r2 in zip(one, two, strict=True):
        for k in ("loss", "stf", "grad_norm"):
            assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-6), (k, r1[k], r2[k])
