"""quickstep-train: presets, fit/sample round trip, and clear exit-2 errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from quickstep.train.cli import main
from quickstep.train.config import ConfigError, apply_overrides, list_presets, load_preset, parse_value

FAST = ["--set", "log.tensorboard=false", "--set", "log.progress=false", "--set", "batch_size=32",
        "--set", "log.sample_n=16", "--set", "log.sample_steps=3", "--set", "data.options={preset = \"ring8\", n = 300}"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_presets_exist_and_load():
    names = list_presets()
    for kind in ("plain", "cp", "fp", "stf", "all"):
        assert f"gmm2d-{kind}" in names and f"digits-{kind}" in names
    assert "cifar10-teacher" in names
    for n in names:
        cfg = load_preset(n)
        assert cfg.objectives
    assert set(load_preset("digits-all").objectives) == {"stf", "cp", "fp"}
    assert load_preset("digits-plain").model.backbone["model_channels"] == 32


def test_overrides_parse_toml_values_and_remove_objectives():
    assert parse_value("1e-3") == 1e-3 and parse_value("true") is True and parse_value("[1, 2]") == [1, 2]
    assert parse_value("none") is None and parse_value("radam") == "radam"
    d = apply_overrides({"objectives": {"diffusion": {}, "cp": {}}}, ["objectives.cp=none", "optim.lr=2e-4"])
    assert d == {"objectives": {"diffusion": {}}, "optim": {"lr": 2e-4}}
    cfg = load_preset("gmm2d-plain", ["objectives.cp.weight=5", "optim.name=radam"])
    assert cfg.objectives["cp"].weight == 5.0 and cfg.optim.name == "radam"


@pytest.mark.parametrize("argv, needle", [
    (["fit", "--preset", "nope", "--out", "x"], "valid presets: "),
    (["fit", "--preset", "gmm2d-plain", "--set", "optim.lrr=1", "--out", "x"], "did you mean 'lr'"),
    (["fit", "--preset", "gmm2d-plain", "--set", "objectives.cq.weight=1", "--out", "x"], "valid keys: "),
    (["fit", "--preset", "gmm2d-plain", "--set", "optim.name=sgd", "--out", "x"], "valid values: adam, radam"),
    (["fit", "--preset", "gmm2d-plain", "--set", "steps=abc", "--out", "x"], "steps must be an integer"),
    (["fit", "--preset", "gmm2d-plain", "--set", "model.backbone.widht=3", "--out", "x"], "valid keys: hidden"),
    (["fit", "--preset", "gmm2d-fp", "--set", "objectives.fp.divergence=x", "--out", "x"], "allowed: auto"),
    (["fit", "--preset", "gmm2d-stf", "--set", "objectives.diffusion.weight=1", "--out", "x"], "exclusive"),
    (["fit", "--preset", "digits-plain", "--data", "/nonexistent.npz", "--out", "x", "--dry-run"], "nonexistent"),
    (["fit", "--out", "x"], "--preset is required"),
    (["sample", "--ckpt", "/nonexistent", "--out", "x.png"], "does not exist"),
    (["sample", "--ckpt", "x", "--sampler", "ddim", "--out", "x.png"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse-level errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and "Traceback" not in err


def test_config_error_is_a_value_error():
    with pytest.raises(ConfigError, match="valid presets"):
        load_preset("gmm3d")


def test_fit_resume_and_sample_in_process(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", "--preset", "gmm2d-all", "--out", str(out), "--steps", "3", *FAST]) == 0
    assert (out / "step-0000003" / "model.safetensors").exists() and (out / "samples" / "final.png").exists()
    assert main(["fit", "--resume", str(out), "--out", str(out), "--steps", "5"]) == 0
    assert (out / "step-0000005").exists()
    png = tmp_path / "s.png"
    assert main(["sample", "--ckpt", str(out), "-n", "50", "--steps", "4", "--out", str(png)]) == 0
    from PIL import Image

    assert Image.open(png).size[0] > 100
    assert main(["fit", "--preset", "digits-plain", "--out", str(tmp_path / "d"), "--dry-run"]) == 0
    assert '"parameters"' in capsys.readouterr().out


def test_console_script_fit_and_sample_conditional_digits(tmp_path, capsys):
    import os
    from pathlib import Path

    exe = Path(sys.executable).with_name("quickstep-train")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "quickstep.train.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*cmd, "fit", "--preset", "digits-stf", "--out", str(tmp_path / "r"), "--steps", "2",
                          "--set", "batch_size=8", "--set", "log.tensorboard=false", "--set", "log.samples=false",
                          "--set", "objectives.stf.ref_batch=64"], capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    png = tmp_path / "g.png"
    assert main(["sample", "--ckpt", str(tmp_path / "r"), "-n", "4", "--steps", "2", "--class", "7",
                 "--sampler", "euler", "--out", str(png)]) == 0
    assert png.exists()
    assert main(["sample", "--ckpt", str(tmp_path / "r"), "--class", "12", "--out", str(png)]) == 2
    assert "--class must be in [0, 9]" in capsys.readouterr().err
