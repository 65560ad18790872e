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


def test_eval_weights_raw_scores_the_training_weights(tmp_path, capsys):
    """--weights raw on a checkpoint (raw A, EMA B) scores exactly what the default EMA does on one whose EMA is A."""
    def mlp(seed):  # fresh nets have zero-initialised output layers, so perturb every weight
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = build_model(ModelConfig(backbone=MLPConfig(dim=2, hidden=16, depth=1, emb_channels=16)))
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            return model

    a, b = mlp(0), mlp(1)
    extra = {"train": {"seed": 0, "data": {"name": "gmm", "options": {"preset": "ring8", "n": 500}}},
             "objectives": ["sct"], "step": 0, "kind": "consistency"}
    ab = save_checkpoint(tmp_path / "ab", a, ema=b, extra_config=extra)
    ba = save_checkpoint(tmp_path / "ba", b, ema=a, extra_config=extra)

    def w1(ck, *weights):
        out = tmp_path / f"rep-{ck.name}-{'-'.join(weights) or 'ema'}"
        assert main(["eval", "--ckpt", str(ck), "--steps", "1", "--n", "64", "--out", str(out), "--diag-n", "32",
                     "--no-progress", *weights]) == 0
        rep = json.loads((out / "report.json").read_text())
        return rep["weights"], rep["quality"][0]["sliced_w1"]

    assert w1(ab, "--weights", "raw") == ("raw", w1(ba)[1])
    assert w1(ab)[1] == w1(ba, "--weights", "raw")[1] != w1(ba)[1]
    assert main(["eval", "--ckpt", str(ab), "--weights", "last", "--out", str(tmp_path / "o")]) == 2
    assert "--weights must be 'ema' or 'raw', got 'last'" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(ab), "--weights", "raw", "--sweep-t-mid", "--record-times",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--record-times" in capsys.readouterr().err
