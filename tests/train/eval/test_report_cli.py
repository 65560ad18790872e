"""`quickstep-train eval` end to end on tiny gmm checkpoints (teacher and student) and its input errors."""

from __future__ import annotations

import json

import pytest
import torch
from quickstep.train.cli import main
from quickstep.train.core import ModelConfig, build_model
from quickstep.train.core.checkpoint import save_checkpoint
from quickstep.train.core.networks import MLPConfig


def _ckpt(path, objectives):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(ModelConfig(backbone=MLPConfig(dim=2, hidden=16, depth=1, emb_channels=16)))
    kind = "consistency" if "sct" in objectives else "diffusion"  # what the trainer records for these objectives
    extra = {"train": {"seed": 0, "data": {"name": "gmm", "options": {"preset": "ring8", "n": 500}}},
             "objectives": objectives, "step": 0, "kind": kind}
    return save_checkpoint(path, model, extra_config=extra)


@pytest.mark.parametrize("objectives,steps", [(["diffusion"], "1,2"), (["sct"], "1,2")])
def test_eval_cli_writes_report_json_md_and_plots(tmp_path, capsys, objectives, steps):
    ck = _ckpt(tmp_path / "ck", objectives)
    out = tmp_path / "rep"
    rc = main(["eval", "--ckpt", str(ck), "--steps", steps, "--n", "64", "--out", str(out), "--nll-n", "8",
               "--diag-n", "32", "--no-progress"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["kind"] == ("consistency" if "sct" in objectives else "diffusion")
    for row in rep["quality"]:  # every quality number with its NFE and wall time per image
        assert row["nfe"] >= 1 and row["seconds_per_image"] > 0 and "sliced_w2" in row
    if rep["kind"] == "diffusion":
        assert [r["nfe"] for r in rep["quality"]] == [1, 3]
        assert {"score_error", "fpe_residual", "cp_violation"} <= set(rep["diagnostics"])
        assert rep["nll"]["nfe"] > 0 and rep["nll"]["n"] == 8
        assert (out / "per_sigma.png").stat().st_size > 0
    else:
        assert [r["nfe"] for r in rep["quality"]] == [1, 2]
        assert rep["ode_error"][0]["teacher_nfe"] == 35
    md = (out / "report.md").read_text()
    assert "| sampler | steps | nfe | seconds_per_image |" in md
    for fig in rep["figures"]:
        assert (out / fig.split("/")[-1]).read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


def test_eval_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    ck = _ckpt(tmp_path / "ck", ["diffusion"])
    assert main(["eval", "--ckpt", str(ck), "--steps", "one", "--out", str(tmp_path / "o")]) == 2
    assert "--steps must be a comma-separated list" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
