"""Issue 17: the exact mixture teacher (`--teacher gmm:<preset>`), the map-error probe in training logs."""

from __future__ import annotations

import json

import pytest
import torch
from quickstep.train.core import checkpoint as ckpt
from quickstep.train.data import gmm_preset
from quickstep.train.loop import Trainer, exact_teacher_name, saved_teacher

from .test_loop import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("objective", ["scd", "direct_cm", "cd"])
def test_exact_teacher_drives_distillation_and_is_recorded(objective, tmp_path):
    cfg = tiny_config({objective: {}}, steps=4, log={"every": 2, "map_error_n": 16})
    tr = Trainer(cfg, tmp_path / "run", teacher="gmm:ring8")
    mix = gmm_preset("ring8")
    x_t, t = torch.randn(32, 2), torch.rand(32) * 1.5 + 0.01
    # the teacher's velocity is the mixture's exact PF-ODE velocity, through train.core's TrigFlowModel
    torch.testing.assert_close(tr.teacher.velocity(x_t, t), mix.velocity_trigflow(x_t, t, 0.5), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in tr.teacher.parameters())
    # the student is the preset's [model] (an exact teacher has no weights to copy)
    assert tr.model.config.backbone.hidden == 64
    tr.fit()
    cfg_json = ckpt.load_config(ckpt.find_checkpoint(tmp_path / "run"))
    assert cfg_json["teacher"] == {"exact": "ring8"}
    assert saved_teacher(tmp_path / "run") == "gmm:ring8"  # --resume finds the exact teacher again
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all("map_err_ema/mean" in r and "map_err/sigma_10-80" in r for r in logs)
    assert all(r["map_err_ema/mean"] > 0 for r in logs)
    # resume continues with the recorded exact teacher
    more = Trainer(tiny_config({objective: {}}, steps=6, log={"every": 2, "map_error_n": 16}), tmp_path / "run",
                   resume=tmp_path / "run")
    assert more.teacher_info.exact == "ring8" and exact_teacher_name("gmm:ring8") == "ring8"
    more.fit()
    assert more.step == 6


def test_exact_teacher_with_init_from_resets_the_logvar_head(tmp_path):
    base = Trainer(tiny_config({"stf": {}}, steps=2), tmp_path / "teacher")
    with torch.no_grad():
        base.ema.logvar_head.linear.bias.fill_(3.0)
    base.save()
    cfg = tiny_config({"scd": {}}, steps=1, init_from=str(tmp_path / "teacher"))
    tr = Trainer(cfg, tmp_path / "student", teacher="gmm:ring8")
    x, t = torch.randn(8, 2), torch.rand(8) + 0.1
    torch.testing.assert_close(tr.model(x, t), base.ema(x, t))  # the network is init_from's EMA
    assert float(tr.model.logvar(t).detach().abs().max()) == 0.0  # a fresh adaptive-weighting head


def test_unknown_exact_teacher_names_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="gmm:ring8"):
        Trainer(tiny_config({"scd": {}}), tmp_path / "x", teacher="gmm:nope")
    assert exact_teacher_name("runs/teacher") is None


def test_t_mid_is_recorded_by_the_trainer_and_by_the_eval_sweep(tmp_path):
    from quickstep.train.core.trigflow import t_max
    from quickstep.train.eval.report import T_MID_GRID, evaluate_checkpoint

    cfg = tiny_config({"sct": {}}, steps=2, t_mid=0.6, log={"map_error_n": 0})
    tr = Trainer(cfg, tmp_path / "run")
    assert tr.map_probe is None  # map_error_n = 0 turns the probe off
    tr.fit()
    path = ckpt.find_checkpoint(tmp_path / "run")
    tm = t_max()
    assert ckpt.recorded_times(ckpt.load_config(path)) == {1: [tm], 2: [tm, 0.6]}
    rep = evaluate_checkpoint(path, n=64, out=tmp_path / "eval", diagnostics_n=8, progress=False,
                              sweep_t_mid=True, record_times=True)
    chosen = rep["t_mid_sweep"]["chosen"]
    assert chosen in T_MID_GRID and len(rep["t_mid_sweep"]["scores"]) == len(T_MID_GRID)
    assert rep["t_mid_sweep"]["scores"][T_MID_GRID.index(chosen)] == min(rep["t_mid_sweep"]["scores"])
    sweep = rep["t_mid_sweep"]
    assert sweep["two_step_gain"] == pytest.approx(sweep["one_step_score"] - min(sweep["scores"]))
    # a 2-step-trained student either gains from its second step or the report says to serve it with steps=1
    assert (sweep["two_step_gain"] >= 0) == ("warnings" not in rep)
    assert ckpt.recorded_times(ckpt.load_config(path))[2] == [tm, chosen]
    assert rep["times"]["2"] == [tm, chosen]
    # eval reports the exact consistency-map error per sigma band for students on mixture data
    assert len(rep["map_error"]) == 7 and all(b["n"] == 8 and b["mean"] > 0 for b in rep["map_error"])
    assert "consistency-map error" in (tmp_path / "eval" / "report.md").read_text()


def test_t_mid_out_of_range_is_a_config_error():
    from quickstep.train.config import ConfigError

    with pytest.raises(ConfigError, match="t_mid"):
        tiny_config({"sct": {}}, t_mid=1.7)


def test_data_scale_warning_names_the_measured_std_and_auto_fixes_it(tmp_path):
    import warnings

    from quickstep.train.data import Dataset, DataSpec
    from quickstep.train.loop import DataScaleWarning, data_scale_message

    g = torch.Generator().manual_seed(0)
    x = 1.5 * torch.randn(2000, 2, generator=g)  # std 1.5 = 3x sigma_data 0.5
    ds = Dataset(x, None, DataSpec("vector", (2,), 0, "wide"))
    with pytest.warns(DataScaleWarning, match=r"std is 1\.[45]\d* but model\.sigma_data is 0\.5"):
        Trainer(tiny_config({"sct": {}}, steps=1), tmp_path / "a", dataset=ds)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataScaleWarning)
        tr = Trainer(tiny_config({"sct": {}}, steps=1, model={"sigma_data": "auto"}), tmp_path / "b", dataset=ds)
        tr.fit()
    assert tr.model.sigma_data == pytest.approx(float(x.double().std()), rel=1e-5)
    saved = ckpt.load_model(ckpt.find_checkpoint(tmp_path / "b"))
    assert saved.sigma_data == pytest.approx(tr.model.sigma_data)  # saved with the checkpoint
    assert data_scale_message(0.9, 0.5) is None and data_scale_message(1.01, 0.5) is not None
    assert data_scale_message(0.24, 0.5) is not None


def test_sigma_data_must_be_a_number_or_auto():
    from quickstep.train.config import ConfigError

    with pytest.raises(ConfigError, match='"auto"'):
        tiny_config({"sct": {}}, model={"sigma_data": "measure"})


def test_adaptive_weighting_switch():
    """adaptive_weighting = false: loss = mean_d (F - F- - g)^2 (u = 0) and the logvar head gets no gradient."""
    from quickstep.train.core.model import build_model
    from quickstep.train.losses.scm import SCMConfig, scm_step

    cfg = tiny_config({"sct": {}})
    from quickstep.train.config import model_config
    from quickstep.train.data import load_dataset

    ds = load_dataset("gmm", seed=0, preset="ring8", n=64)
    model = build_model(model_config(cfg, ds.spec))
    with torch.no_grad():
        model.logvar_head.linear.bias.fill_(0.7)
    g = torch.Generator().manual_seed(0)
    x0, z, t = ds.x[:32], 0.5 * torch.randn(32, 2, generator=g), torch.rand(32, generator=g) + 0.1
    on = scm_step(model, x0, z, t, None, SCMConfig(), r=1.0)
    off = scm_step(model, x0, z, t, None, SCMConfig(adaptive_weighting=False), r=1.0)
    torch.testing.assert_close(off.loss, off.mse)
    torch.testing.assert_close(on.loss, torch.exp(torch.tensor(-0.7)) * on.mse + 0.7)
    off.loss.mean().backward()
    assert model.logvar_head.linear.bias.grad is None
    on.loss.mean().backward()
    assert model.logvar_head.linear.bias.grad is not None


def test_two_step_warning_names_both_scores_only_when_the_second_step_loses():
    from quickstep.train.eval.report import two_step_warning

    sweep = {"grid": [0.2, 0.4], "scores": [0.031, 0.030], "chosen": 0.4, "one_step_score": 0.025, "seed": 7, "n": 64,
             "two_step_gain": 0.025 - 0.030}
    msg = two_step_warning(sweep, "sliced W1")
    assert msg is not None and "t_mid 0.4" in msg and "0.03" in msg and "0.025" in msg and "steps=1" in msg
    assert two_step_warning({**sweep, "one_step_score": 0.04, "two_step_gain": 0.01}, "FD") is None
    # with a guard: W1 gained but no t_mid is no worse in the guard too -> warned, naming both
    guarded = {**sweep, "one_step_score": 0.04, "two_step_gain": 0.01, "guard": "minus the log-lik",
               "guard_scores": [0.5, 0.6], "one_step_guard": 0.45, "no_worse": []}
    msg = two_step_warning(guarded, "sliced W1")
    assert msg is not None and "both sliced W1 and minus the log-lik" in msg and "0.6" in msg and "0.45" in msg
    assert two_step_warning({**guarded, "no_worse": [0.2]}, "sliced W1") is None


def test_t_mid_sweep_guard_picks_the_best_t_mid_no_worse_than_one_step_in_both():
    """A synthetic student whose output is sin(t) * sigma_d whatever x: a 1-step sample is sin(t_max) * sigma_d and a
    2-step one sin(t_mid) * sigma_d, so each run's t is known exactly and the choice can be worked out by hand."""
    from quickstep.train.core.trigflow import t_max
    from quickstep.train.eval.report import t_mid_sweep

    class Fake(torch.nn.Module):
        sigma_data, num_classes, sample_shape = 0.5, 0, (1,)

        def forward(self, x, t, class_labels=None):  # [b, 1]
            return x * 0 + torch.sin(t.reshape(-1, 1)) * self.sigma_data

    def t_of(run) -> float:  # the time of the run's last step
        return float(torch.asin(run.samples.double().mean() / 0.5))

    grid, tm = (0.1, 0.4, 0.8, 1.2), t_max(sigma_data=0.5)
    score = lambda run: abs(t_of(run) - 0.4)  # noqa: E731 - 2 steps: 0.3, 0, 0.4, 0.8; 1 step: t_max - 0.4 ~ 1.16
    guard = lambda run: abs(t_of(run) - 1.0)  # noqa: E731 - 2 steps: 0.9, 0.6, 0.2, 0.2; 1 step: t_max - 1 ~ 0.56
    sweep = t_mid_sweep(Fake(), score, n=8, seed=0, grid=grid, guard_fn=guard, guard_name="g")
    assert sweep["one_step_score"] == pytest.approx(tm - 0.4, abs=1e-5)
    assert sweep["guard_scores"] == pytest.approx([0.9, 0.6, 0.2, 0.2], abs=1e-5)
    assert sweep["no_worse"] == [0.8, 1.2] and sweep["chosen"] == 0.8  # the best score among those no worse in both
    assert sweep["two_step_gain"] == pytest.approx(tm - 0.4 - 0.4, abs=1e-5)
    unguarded = t_mid_sweep(Fake(), score, n=8, seed=0, grid=grid)
    assert unguarded["chosen"] == 0.4 and "guard" not in unguarded
    # no t_mid passes the guard: the best score is chosen anyway, and no_worse says none passed
    strict = t_mid_sweep(Fake(), score, n=8, seed=0, grid=grid, guard_fn=lambda run: -t_of(run), guard_name="g")
    assert strict["no_worse"] == [] and strict["chosen"] == 0.4
