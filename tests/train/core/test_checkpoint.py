"""Checkpoints: bit-exact round trip, atomic replace/recovery, and a documented error for every bad case."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from quickstep.train.core import ModelConfig, UNetConfig
from quickstep.train.core.checkpoint import (
    CONFIG,
    STATE,
    WEIGHTS,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    load_config,
    load_model,
    load_state,
    load_weights,
    resolve_dir,
    save_checkpoint,
)

from tests.helpers import tiny_checkpoint, tiny_model, tiny_unet_config


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Evil:
    """Unpickling this object would create a file: the marker proves whether code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def ckpt(tmp_path):
    return tiny_checkpoint(tmp_path, num_classes=10)


def test_round_trip_bit_exact(tmp_path):
    model, ema = tiny_model(10, seed=0), tiny_model(10, seed=1)
    d = save_checkpoint(tmp_path / "ck", model, ema=ema, extra_config={"kind": "consistency", "step": 7},
                        state={"step": 7, "opt": {"lr": torch.tensor(1e-3)}})
    assert sorted(p.name for p in d.iterdir()) == sorted([WEIGHTS, CONFIG, STATE])
    assert _same_weights(load_model(d), ema) and _same_weights(load_model(d, which="raw"), model)
    assert not _same_weights(load_model(d), model)
    cfg = load_config(d)
    assert cfg["kind"] == "consistency" and cfg["step"] == 7
    assert ModelConfig.from_dict(cfg["model"]) == model.config
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 1.2]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(load_model(d)(x, t, y), ema(x, t, y))
    st = load_state(d)
    assert st["step"] == 7 and float(st["opt"]["lr"]) == pytest.approx(1e-3)
    assert not load_model(d).training
    with pytest.raises(ValueError, match="which"):
        load_model(d, which="best")


def test_without_ema_both_views_are_the_model(tmp_path):
    model = tiny_model(0)
    d = save_checkpoint(tmp_path / "ck", model)
    assert _same_weights(load_model(d), model) and _same_weights(load_model(d, which="raw"), model)
    with pytest.raises(CheckpointNotFoundError, match=STATE):
        load_state(d)


def test_atomic_save_replaces_and_leaves_no_temporaries(tmp_path):
    d = save_checkpoint(tmp_path / "ck", tiny_model(0, seed=0))
    new = tiny_model(0, seed=5)
    save_checkpoint(d, new)
    assert _same_weights(load_model(d), new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_interrupted_save_recovered_from_old(tmp_path, ckpt):
    """A crash between 'rename DIR -> DIR.old' and 'rename tmp -> DIR' leaves only DIR.old."""
    ref = load_model(ckpt)
    old = ckpt.with_name(ckpt.name + ".old")
    os.rename(ckpt, old)
    assert resolve_dir(ckpt) == old
    assert _same_weights(load_model(ckpt), ref)
    save_checkpoint(ckpt, ref)  # the next save cleans the stale .old up
    assert not old.exists() and _same_weights(load_model(ckpt), ref)


def test_missing_directory_and_files(tmp_path, ckpt):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    assert issubclass(CheckpointNotFoundError, FileNotFoundError) and issubclass(CheckpointError, ValueError)
    (ckpt / WEIGHTS).unlink()
    with pytest.raises(CheckpointNotFoundError, match=WEIGHTS):
        load_model(ckpt)
    (ckpt / CONFIG).unlink()
    with pytest.raises(CheckpointNotFoundError, match=CONFIG):
        load_model(ckpt)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointFormatError, match="directory"):
        load_model(f)


def test_pickle_posing_as_safetensors_is_never_unpickled(tmp_path, ckpt):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(1), "evil": _Evil(marker)}, ckpt / WEIGHTS)  # zip-format pickle
    with pytest.raises(CheckpointFormatError, match="pickle"):
        load_model(ckpt)
    (ckpt / WEIGHTS).write_bytes(pickle.dumps(_Evil(marker), protocol=2))  # a raw pickle
    with pytest.raises(CheckpointFormatError):
        load_model(ckpt)
    (ckpt / WEIGHTS).write_bytes(pickle.dumps(_Evil(marker), protocol=0))  # protocol 0 has no magic bytes
    with pytest.raises(CheckpointError):
        load_weights(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0.5, 0.999, 7])
def test_truncated_safetensors(ckpt, keep):
    f = ckpt / WEIGHTS
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:keep])
    with pytest.raises(CheckpointCorruptError, match="truncated|damaged"):
        load_model(ckpt)


def test_damaged_config(ckpt):
    (ckpt / CONFIG).write_text("{not json")
    with pytest.raises(CheckpointCorruptError, match="JSON"):
        load_model(ckpt)
    (ckpt / CONFIG).write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointFormatError, match="model"):
        load_model(ckpt)
    (ckpt / CONFIG).write_text(json.dumps({"model": {"backbone": {"kind": "unet", "no_such_field": 1}}}))
    with pytest.raises(CheckpointFormatError, match="invalid"):
        load_model(ckpt)


def test_wrong_shapes(tmp_path, ckpt):
    cfg = load_config(ckpt)
    cfg["model"]["backbone"]["model_channels"] = 16  # the weights were saved for 8
    (ckpt / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match="wrong shapes"):
        load_model(ckpt)
    # weights for an unconditional model under a conditional config: missing label embedding
    other = tmp_path / "other"
    save_checkpoint(other, tiny_model(0))
    shutil.copy(other / WEIGHTS, ckpt / WEIGHTS)
    (ckpt / CONFIG).write_text(json.dumps({"model": tiny_unet_config(10).to_dict()}))
    with pytest.raises(CheckpointMismatchError, match="missing"):
        load_model(ckpt)
    bigger = ModelConfig(UNetConfig(img_resolution=8, model_channels=8, channel_mult=(1, 2, 2), attn_resolutions=(4,)))
    (ckpt / CONFIG).write_text(json.dumps({"model": bigger.to_dict()}))
    with pytest.raises(CheckpointMismatchError):
        load_model(ckpt)


def test_malicious_state_refused(tmp_path, ckpt):
    marker = tmp_path / "pwned-state"
    torch.save({"step": 1, "evil": _Evil(marker)}, ckpt / STATE)
    with pytest.raises(CheckpointFormatError, match="refusing"):
        load_state(ckpt)
    assert not marker.exists()
    torch.save({"step": 1, "t": torch.zeros(1000)}, ckpt / STATE)
    data = (ckpt / STATE).read_bytes()
    (ckpt / STATE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointCorruptError):
        load_state(ckpt)


@pytest.mark.parametrize("kind,num_classes", [("consistency", 0), ("diffusion", 10)])
def test_tiny_checkpoint_helper(tmp_path, kind, num_classes):
    d = tiny_checkpoint(tmp_path, kind=kind, num_classes=num_classes)
    cfg = load_config(d)
    assert cfg["kind"] == kind and cfg["data"]["num_classes"] == num_classes
    model = load_model(d)
    assert model.num_classes == num_classes and model.sample_shape == (1, 8, 8)
    with torch.no_grad():
        out = model(torch.randn(2, 1, 8, 8), torch.tensor([0.5, 1.0]))
    assert float(out.std()) > 1e-2  # the zero-initialised output layers were perturbed
    with pytest.raises(ValueError, match="kind"):
        tiny_checkpoint(tmp_path, kind="gan")
