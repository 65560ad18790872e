"""The training loop reads device values on the host only at log intervals (issue 18, as nanoGPT does).

On CUDA every `Tensor.item / tolist / __float__ / __bool__ ...` waits for the device.  On CPU nothing waits, so the
test counts those calls instead: the Tensor methods that turn a value into a Python number are patched to count
the calls made from Quickstep's own code (torch's internals, e.g. the optimizer's CPU step counter, do not sync).
A fit of 2N steps must make exactly as many host reads as a fit of N steps when both log and checkpoint only at
their end: the per-step path reads nothing."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch
from quickstep.train.loop import NonFiniteLossError, Trainer

from tests.train.test_loop import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = tuple(str(ROOT / d) for d in ("train", "quickstep"))
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")


@contextlib.contextmanager
def count_host_reads():
    """Count the calls of READS made from Quickstep's source (train/, quickstep/); yields a dict
    'file.py:method' -> count (the file relative to the repository)."""
    counts: dict[str, int] = {}
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, fn):
        def counted(self, *a, **k):
            where = sys._getframe(1).f_code.co_filename
            if where.startswith(PACKAGE_DIRS):
                key = f"{Path(where).relative_to(ROOT)}:{name}"
                counts[key] = counts.get(key, 0) + 1
            return fn(self, *a, **k)

        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def reads_of_a_fit(tmp_path: Path, steps: int, objectives: dict, **over) -> dict[str, int]:
    log = {"every": steps, "ckpt_every": steps}
    cfg = tiny_config(objectives, steps=steps, log=log, **over)
    tr = Trainer(cfg, tmp_path / f"run{steps}")
    try:
        with count_host_reads() as counts:
            tr.fit()
    finally:
        tr.close()
    return counts


def per_step_reads(tmp_path: Path, objectives: dict, **over) -> dict[str, float]:
    """'file.py:method' -> host reads per step (the difference between fits of 2n and n steps, over n); only the
    places that read per step."""
    n = 4
    long, short = (reads_of_a_fit(tmp_path, k, objectives, **over) for k in (2 * n, n))
    per = {k: (long.get(k, 0) - short.get(k, 0)) / n for k in long.keys() | short.keys()}
    return {k: v for k, v in per.items() if v}


@pytest.mark.parametrize(("objectives", "objective_reads"), [
    ({"diffusion": {}}, {}),
    ({"diffusion": {}, "cp": {"batch_fraction": 0.25}}, {}),
    ({"diffusion": {}, "fp": {"batch_fraction": 0.25}}, {}),
    # STF checks on the host that every sample has a reference of its class (a clear error, not a device assert)
    ({"stf": {"ref_batch": 256}}, {"train/losses/stf.py:__bool__": 1.0}),
    # sCM decides on the host to replace a non-finite tangent's loss by an exact zero (its diagnostics stay tensors)
    ({"sct": {}}, {"train/losses/scm.py:__bool__": 1.0}),
], ids=["plain", "cp", "fp", "stf", "sct"])
def test_the_loop_makes_no_host_read_per_step(tmp_path, objectives, objective_reads):
    """A fused Adam skips a step on the device (`found_inf`), so the NaN guard and an objective's skip request are
    device-side flags inspected when the loop logs: the loop reads nothing per step (before issue 18: two reads,
    the terms' `.tolist()` and `float(clip_grad_norm_)`)."""
    assert per_step_reads(tmp_path, objectives, optim={"fused": "on"}) == objective_reads


def test_a_non_fused_optimizer_reads_one_flag_per_step(tmp_path):
    """Adam without the fused kernel (and RAdam, which has none) cannot skip an update on the device: the loop reads
    one flag (non-finite, skip) per step so that no update is applied with a bad loss."""
    assert per_step_reads(tmp_path, {"diffusion": {}}, optim={"fused": "off"}) == {"train/loop.py:tolist": 1.0}


def test_device_guard_trains_bit_for_bit_like_the_host_guard(tmp_path):
    """The device-side guard (fused Adam's found_inf, the EMA kept by torch.where) changes no number: the same
    logs, losses, weights and EMA as the same fused optimizer stepped under the host-side guard."""
    cfg = tiny_config({"diffusion": {}, "cp": {"batch_fraction": 0.25}}, steps=6, optim={"fused": "on"},
                      log={"every": 2, "ckpt_every": 3})
    runs = []
    for device_guard in (True, False):
        tr = Trainer(cfg, tmp_path / str(device_guard))
        tr.device_guard = device_guard
        runs.append((tr, tr.fit()))
        tr.close()
    (a, ra), (b, rb) = runs
    assert ra.losses == rb.losses and len(ra.losses) == 6
    assert [{k: v for k, v in r.items() if k not in ("time", "img_per_s", "data_img_per_s", "data_wait_frac")}
            for r in ra.logs] == [{k: v for k, v in r.items() if k not in ("time", "img_per_s", "data_img_per_s",
                                                                             "data_wait_frac")} for r in rb.logs]
    for sa, sb in ((a.model.state_dict(), b.model.state_dict()), (a.ema.state_dict(), b.ema.state_dict())):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


def test_device_guard_stops_at_the_bad_step_with_no_update_applied(tmp_path):
    """With the device-side guard the NaN is found at the next log, but it names the step and the term, no update
    after it was applied (weights, EMA and the step counter are those before the bad step) and no checkpoint holds it."""
    cfg = tiny_config({"diffusion": {}, "test_nan_injector": {"at_step": 2}}, steps=8, optim={"fused": "on"},
                      log={"every": 5, "ckpt_every": 5})
    ref = Trainer(tiny_config({"diffusion": {}, "test_nan_injector": {"at_step": 99}}, steps=2,
                              optim={"fused": "on"}, log={"every": 5, "ckpt_every": 5}), tmp_path / "ref")
    ref.fit()
    ref.close()
    tr = Trainer(cfg, tmp_path / "run")
    assert tr.device_guard
    with pytest.raises(NonFiniteLossError, match=r"step 2: loss term 'injected' is nan"):
        tr.fit()
    tr.close()
    assert tr.step == 2
    for sa, sb in ((tr.model.state_dict(), ref.model.state_dict()), (tr.ema.state_dict(), ref.ema.state_dict())):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert not list((tmp_path / "run").glob("step-*"))
