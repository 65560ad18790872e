"""Training's GPU options (issue 21): channels_last, fused Adam/AdamW, TF32, a compiled backbone, bf16 autocast, DDP
over NCCL.  The CPU tests check that each option leaves the training computation unchanged; the `gpu` tests run
the same on CUDA (skipped without it)."""

from __future__ import annotations

import os

import pytest
import torch
from quickstep.train.config import ConfigError, TrainConfig, build_config
from quickstep.train.core import checkpoint as ckpt
from quickstep.train.loop import Trainer

from tests.train.test_loop import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = {"every": 1, "ckpt_every": 1000, "tensorboard": False, "progress": False, "samples": False}




def unet_config(objectives: dict, **over) -> TrainConfig:
    """A tiny class-conditional UNet on the 8x8 digits."""
    d = {"steps": 3, "batch_size": 16, "seed": 0, "device": "cpu",
         "data": {"name": "digits", "resolution": 8},
         "model": {"kind": "unet", "logvar_channels": 8,
                   "backbone": {"model_channels": 8, "channel_mult": [1, 2], "attn_resolutions": [4]}},
         "optim": {"lr": 1e-3}, "ema": {"halflife_kimg": 1.0}, "log": dict(QUIET), "objectives": objectives}
    d.update(over)
    return build_config(d)


def _fit(cfg: TrainConfig, out) -> tuple[Trainer, list[dict]]:
    """The trainer and its per-step records (QUIET logs every step, so each log record is one step's metrics)."""
    tr = Trainer(cfg, out)
    res = tr.fit()
    tr.close()
    assert len(res.logs) == res.step
    return tr, res.logs


OBJECTIVES = {"diffusion": {}, "sct": {"jvp": "forward_ad"}}


def test_channels_last_and_fused_adamw_train_the_same_on_cpu(tmp_path):
    """channels_last + fused AdamW vs the plain layout and for-loop AdamW: the same losses and weights (to float
    rounding), and the checkpoint holds ordinary contiguous weights that load into a plain model."""
    base = dict(optim={"name": "adamw", "lr": 1e-3, "weight_decay": 0.01})
    tr0, plain = _fit(unet_config(OBJECTIVES, channels_last="off", **base), tmp_path / "plain")
    cfg = unet_config(OBJECTIVES, channels_last="on", optim={**base["optim"], "fused": "on"})
    tr1, fast = _fit(cfg, tmp_path / "fast")
    assert isinstance(tr1.optimizer, torch.optim.AdamW) and tr1.optimizer.defaults["fused"]
    assert tr1.model.backbone.channels_last and not tr0.model.backbone.channels_last
    assert tr1.model.backbone.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(plain, fast, strict=True):
        for k in ("loss", "diffusion", "sct", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=2e-4, abs=1e-6), (k, a[k], b[k])
    m0 = ckpt.load_model(tmp_path / "plain" / "step-0000003", which="raw")
    m1 = ckpt.load_model(tmp_path / "fast" / "step-0000003", which="raw")
    for p, q in zip(m0.parameters(), m1.parameters(), strict=True):
        assert q.is_contiguous()
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def test_gpu_options_validate():
    with pytest.raises(ConfigError, match="valid values: auto, on, off"):
        unet_config(OBJECTIVES, channels_last="yes")
    with pytest.raises(ConfigError, match="valid values: auto, on, off"):
        unet_config(OBJECTIVES, optim={"fused": "maybe"})
    cfg = unet_config(OBJECTIVES)
    assert cfg.tf32 and cfg.channels_last == "auto" and cfg.optim.fused == "auto" and not cfg.compile


@pytest.mark.slow
def test_compiled_backbone_trains_like_eager_with_jvp_and_fp(tmp_path):
    """compile = true: DSM runs the compiled backbone; sCT's exact JVP and FP's double backward run it eagerly
    (exact_autodiff); the losses equal the eager run's.  Slow: Inductor compiles on CPU."""
    objectives = {"diffusion": {}, "sct": {"jvp": "forward_ad"}, "fp": {"batch_fraction": 0.25}}
    _, eager = _fit(unet_config(objectives), tmp_path / "eager")
    _, comp = _fit(unet_config(objectives, compile=True), tmp_path / "compiled")
    for a, b in zip(eager, comp, strict=True):
        for k in ("loss", "diffusion", "sct", "fp"):
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-5), (k, a[k], b[k])


# ----------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
def test_cuda_defaults_bf16_tf32_fused_channels_last(tmp_path):
    """On CUDA the defaults turn on bf16 autocast, TF32, fused Adam and channels_last; DSM + sCT train with finite
    losses that match the CPU float32 run's first step (bf16 tolerance), and the loss goes down over 30 steps."""
    tr, terms = _fit(unet_config(OBJECTIVES, device="cuda", steps=30), tmp_path / "cuda")
    assert tr.amp and tr.optimizer.defaults["fused"] and tr.model.backbone.channels_last
    assert torch.backends.cuda.matmul.allow_tf32
    _, cpu = _fit(unet_config(OBJECTIVES, steps=1), tmp_path / "cpu")
    assert terms[0]["diffusion"] == pytest.approx(cpu[0]["diffusion"], rel=0.05)
    first = sum(t["diffusion"] for t in terms[:5]) / 5
    last = sum(t["diffusion"] for t in terms[-5:]) / 5
    assert last < first, (first, last)


@pytest.mark.gpu
def test_cuda_compiled_backbone_with_jvp(tmp_path):
    objectives = {"diffusion": {}, "sct": {"jvp": "forward_ad"}}
    _, eager = _fit(unet_config(objectives, device="cuda", amp="none", tf32=False), tmp_path / "eager")
    _, comp = _fit(unet_config(objectives, device="cuda", amp="none", tf32=False, compile=True), tmp_path / "comp")
    for a, b in zip(eager, comp, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-5)


@pytest.mark.gpu
def test_nccl_one_process_matches_no_process_group(tmp_path, monkeypatch):
    """DDP over NCCL with one process: the all-reduce paths run and give the non-distributed run's losses."""
    import torch.distributed as dist

    cfg = unet_config(OBJECTIVES, device="cuda", amp="none", tf32=False, channels_last="off")
    _, ref = _fit(cfg, tmp_path / "plain")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        tr = Trainer(cfg, tmp_path / "nccl")
        assert tr.distributed and dist.get_backend() == "nccl"
        terms = tr.fit().logs  # QUIET: one record per step
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    for a, b in zip(ref, terms, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)


def test_max_seconds_ends_the_run_at_a_logged_checkpointed_step(tmp_path):
    """max_seconds time-boxes a run (the device suite's 60-second training): the step past the deadline is the last
    one, and it is logged and checkpointed like a normal end."""
    import json

    cfg = tiny_config({"diffusion": {}}, steps=1_000_000, max_seconds=1.0)
    tr = Trainer(cfg, tmp_path)
    res = tr.fit()
    tr.close()
    assert 0 < res.step < 1_000_000 and res.checkpoint == tmp_path / f"step-{res.step:07d}"
    last = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == res.step and last["img_per_s"] > 0
