"""quickstep-train: presets, fit/sample round trip, and clear exit-2 errors for bad input."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from quickstep.train.cli import main
from quickstep.train.config import ConfigError, apply_overrides, list_presets, load_preset, parse_value

FAST = ["--set", "log.tensorboard=false", "--set", "log.progress=false", "--set", "batch_size=32",
        "--set", "log.sample_n=16", "--set", "log.sample_steps=3", "--set", "data.options={preset = \"ring8\", n = 300}"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_presets_exist_and_load():
    names = list_presets()
    for kind in ("plain", "cp", "fp", "stf", "all"):
        assert f"gmm2d-{kind}" in names and f"digits-{kind}" in names
    assert "cifar10-teacher" in names
    for n in names:
        cfg = load_preset(n)
        assert cfg.objectives
    assert set(load_preset("digits-all").objectives) == {"stf", "cp", "fp"}
    assert load_preset("digits-plain").model.backbone.model_channels == 32


def test_presets_trained_from_scratch_use_time_scale_10():
    """sCD distils from dF/dt: teachers (and sCT) use a smooth t-embedding, not the backbone default 1000.
    Students initialised from a teacher inherit its architecture, so their [model] is not checked."""
    from quickstep.train.losses import get_objective_spec

    checked = []
    for n in list_presets():
        cfg = load_preset(n)
        if any(getattr(get_objective_spec(o).factory, "init_from_teacher", False) for o in cfg.objectives):
            continue
        assert cfg.model.backbone.time_scale == 10.0, n
        checked.append(n)
    assert {"gmm2d-plain", "gmm2d-all", "gmm2d-sct", "cifar10-teacher", "digits-stf"} <= set(checked)


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
    (["fit", "--preset", "gmm2d-plain", "--set", "optim.name=sgd", "--out", "x"], "valid values: adam, adamw, radam"),
    (["fit", "--preset", "gmm2d-plain", "--set", "steps=abc", "--out", "x"], "steps must be an integer"),
    (["fit", "--preset", "gmm2d-plain", "--set", "model.backbone.widht=3", "--out", "x"], "valid keys: hidden"),
    (["fit", "--preset", "gmm2d-fp", "--set", "objectives.fp.divergence=x", "--out", "x"], "allowed: auto"),
    (["fit", "--preset", "gmm2d-stf", "--set", "objectives.diffusion.weight=1", "--out", "x"], "exclusive"),
    (["fit", "--preset", "digits-plain", "--data", "/nonexistent.npz", "--out", "x", "--dry-run"], "nonexistent"),
    (["fit", "--out", "x"], "--preset is required"),
    (["sample", "--ckpt", "/nonexistent", "--out", "x.png"], "does not exist"),
    (["sample", "--ckpt", "x", "--sampler", "ddim", "--out", "x.png"],
     "'ddim' is not one of 'heun', 'euler', 'sde', 'consistency'"),
    (["frobnicate"], "No such command 'frobnicate'; valid commands: data, eval, fit, presets, sample"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as e:  # never expected: main returns the exit status
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


def test_fit_refuses_to_overwrite_a_run(tmp_path, capsys):
    """A fresh fit (or a resume of another run) into a directory holding a run's checkpoints exits 2 naming --resume,
    and leaves that run's checkpoints as they were; resuming the run in place still works."""
    out, other = tmp_path / "run", tmp_path / "other"
    assert main(["fit", "--preset", "gmm2d-plain", "--out", str(out), "--steps", "2", *FAST]) == 0
    assert main(["fit", "--preset", "gmm2d-plain", "--out", str(other), "--steps", "2", *FAST]) == 0
    weights = (out / "step-0000002" / "model.safetensors").read_bytes()
    capsys.readouterr()
    for argv in (["fit", "--preset", "gmm2d-plain", "--out", str(out), "--steps", "1", *FAST],
                 ["fit", "--resume", str(other), "--out", str(out), "--steps", "3"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "already holds a run (latest checkpoint step-0000002)" in err and f"--resume '{out}'" in err
        assert "Traceback" not in err
    assert sorted(p.name for p in out.glob("step-*")) == ["step-0000002"]
    assert (out / "step-0000002" / "model.safetensors").read_bytes() == weights
    assert main(["fit", "--resume", str(out / "step-0000002"), "--out", str(out), "--steps", "3"]) == 0
    assert (out / "step-0000003").exists()
    capsys.readouterr()
    # rerunning a finished run (as `make pipeline` does) trains nothing and names its last checkpoint
    assert main(["fit", "--resume", str(out), "--out", str(out), "--steps", "3"]) == 0
    assert "trained 3 steps; last checkpoint: " in (o := capsys.readouterr().out) and o.rstrip().endswith("step-0000003")


def test_fit_records_init_from_and_data_relative_to_the_working_directory(tmp_path, monkeypatch):
    """Absolute --set init_from / --data paths are saved relative to the working directory (as the teacher is), so
    that no checkpoint holds a path of the machine that made it; the run resumes from them."""
    import json

    import numpy as np

    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "pts.npz", x=np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32) * 0.5)
    assert main(["fit", "--preset", "gmm2d-plain", "--out", "first", "--steps", "2", *FAST]) == 0
    assert main(["fit", "--preset", "gmm2d-plain", "--data", str(tmp_path / "pts.npz"), "--out", str(tmp_path / "b"),
                 "--steps", "2", "--set", f"init_from={tmp_path / 'first'}", *QUIET]) == 0
    train = json.loads((tmp_path / "b" / "step-0000002" / "config.json").read_text())["train"]
    assert train["init_from"] == "first" and train["data"]["path"] == "pts.npz"
    assert str(tmp_path) not in (tmp_path / "b" / "step-0000002" / "config.json").read_text()
    assert main(["fit", "--resume", "b", "--out", "b", "--steps", "3"]) == 0


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


# ----------------------------------------------------------------------------------------------- npz, sCD, sample
QUIET = ["--set", "log.tensorboard=false", "--set", "log.progress=false", "--set", "log.samples=false",
         "--set", "log.every=1", "--set", "batch_size=32"]
RING = ["--set", 'data.options={preset = "ring8", n = 300}']


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A 2-step gmm2d-plain teacher trained through the CLI on an .npz of 2-D vectors written here."""
    import numpy as np
    from quickstep.train.data import gmm_preset

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d = tmp_path_factory.mktemp("teacher")
        x = gmm_preset("ring8").sample(200, torch.Generator().manual_seed(0)).numpy()  # [200, 2]
        np.savez(d / "ring.npz", x=x)
        out = d / "run"
        rc = main(["fit", "--preset", "gmm2d-plain", "--data", str(d / "ring.npz"), "--out", str(out),
                   "--steps", "2", *QUIET])
        return rc, out
    finally:
        torch.set_num_threads(n)


def _scd(out, *extra):
    return main(["fit", "--preset", "gmm2d-scd", "--out", str(out), *extra, *QUIET, *RING])


@pytest.fixture(scope="module")
def student_run(teacher_run, tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("student") / "run"
        return _scd(out, "--teacher", str(teacher_run[1]), "--steps", "2"), out
    finally:
        torch.set_num_threads(n)


def test_fit_trains_on_an_npz_of_vectors(teacher_run):
    import json

    from quickstep.train.core.checkpoint import load_config

    rc, out = teacher_run
    assert rc == 0
    meta = load_config(out / "step-0000002")
    assert meta["train"]["data"]["name"] == "npz" and meta["train"]["data"]["path"].endswith("ring.npz")
    assert meta["data"]["shape"] == [2] and meta["data"]["num_classes"] == 0
    assert meta["model"]["backbone"]["dim"] == 2 and "teacher" not in meta
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)


def test_fit_scd_with_a_teacher_records_it(student_run, teacher_run):
    import hashlib

    from quickstep.train.core.checkpoint import load_config

    rc, out = student_run
    assert rc == 0
    meta = load_config(out / "step-0000002")
    assert meta["objectives"] == ["scd"]
    assert meta["kind"] == "consistency" and meta["sampler"]["name"] == "consistency"
    tdir = (teacher_run[1] / "step-0000002").resolve()  # the run directory resolves to its latest checkpoint
    # the teacher is its hash and a reference relative to the working directory, never an absolute path
    assert meta["teacher"] == {"ref": os.path.relpath(tdir),
                               "sha256": hashlib.sha256((tdir / "model.safetensors").read_bytes()).hexdigest()}


def test_resume_scd_without_teacher_uses_the_recorded_one(teacher_run, tmp_path, capsys):
    import shutil

    from quickstep.train.core.checkpoint import load_config

    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_run[1] / "step-0000002", teacher)
    out = tmp_path / "run"
    assert _scd(out, "--teacher", str(teacher), "--steps", "2") == 0
    assert main(["fit", "--resume", str(out), "--out", str(out), "--steps", "3"]) == 0  # no --teacher
    assert load_config(out / "step-0000003")["teacher"]["ref"] == os.path.relpath(teacher.resolve())
    # the recorded teacher is gone: a clear error naming it, exit 2
    teacher.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["fit", "--resume", str(out), "--out", str(out), "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "no longer exists" in err and os.path.relpath(teacher.resolve()) in err and "--teacher" in err
    assert "Traceback" not in err and not (out / "step-0000004").exists()
    # an explicit --teacher still works (and is recorded from then on)
    assert main(["fit", "--resume", str(out), "--out", str(out), "--steps", "4", "--teacher",
                 str(tmp_path / "moved")]) == 0
    assert load_config(out / "step-0000004")["teacher"]["ref"] == os.path.relpath((tmp_path / "moved").resolve())
    # the recorded teacher changed on disk: refused rather than silently distilling another model
    with open(tmp_path / "moved" / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    capsys.readouterr()
    assert main(["fit", "--resume", str(out), "--out", str(out), "--steps", "5"]) == 2
    assert "has changed" in capsys.readouterr().err


def _sample(ckpt, png, *extra) -> int:
    return main(["sample", "--ckpt", str(ckpt), "-n", "8", "--out", str(png), *extra])


def test_sample_defaults_follow_the_checkpoint_kind(teacher_run, student_run, tmp_path, capsys):
    assert teacher_run[0] == 0 and student_run[0] == 0
    capsys.readouterr()
    assert _sample(student_run[1], tmp_path / "s.png") == 0
    assert "consistency sampler, 1 step" in capsys.readouterr().out
    assert _sample(student_run[1], tmp_path / "s1.png", "--sampler", "consistency", "--steps", "1") == 0
    assert (tmp_path / "s.png").read_bytes() == (tmp_path / "s1.png").read_bytes()
    assert _sample(teacher_run[1], tmp_path / "t.png") == 0
    assert "heun sampler, 18 steps" in capsys.readouterr().out
    assert _sample(teacher_run[1], tmp_path / "t18.png", "--sampler", "heun", "--steps", "18") == 0
    assert (tmp_path / "t.png").read_bytes() == (tmp_path / "t18.png").read_bytes()
    assert _sample(teacher_run[1], tmp_path / "t4.png", "--steps", "4") == 0  # heun with 4 steps
    assert "heun sampler, 4 steps" in capsys.readouterr().out
    # an explicit sampler still wins over the checkpoint kind
    assert _sample(student_run[1], tmp_path / "h.png", "--sampler", "heun", "--steps", "3") == 0
    assert "heun sampler, 3 steps" in capsys.readouterr().out
    assert _sample(student_run[1], tmp_path / "c2.png", "--steps", "2") == 0
    assert "consistency sampler, 2 steps" in capsys.readouterr().out


@pytest.mark.parametrize("which, extra, needle", [
    ("student", ["--steps", "0"], "--steps must be >= 1 for the consistency sampler"),
    ("teacher", ["--sampler", "consistency", "--steps", "0"], "--steps must be >= 1 for the consistency sampler"),
    ("student", ["--sampler", "heun", "--steps", "-1"], "--steps must be >= 1 for the heun sampler"),
])
def test_sample_bad_steps_exit_2(which, extra, needle, teacher_run, student_run, tmp_path, capsys):
    run = {"teacher": teacher_run, "student": student_run}[which][1]
    assert _sample(run, tmp_path / "x.png", *extra) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and not (tmp_path / "x.png").exists()
