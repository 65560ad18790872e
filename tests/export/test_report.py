"""`quickstep-export report`: quality and latency measured through the serve backends, the FD tolerance, the
manifest's quality section, and the server's quality gate (real onnxruntime, real uvicorn on 127.0.0.1)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from quickstep.export.bundle import read_manifest, refresh_files
from quickstep.export.report import ReportConfig, apply_tolerance, make_report
from quickstep.train.core import ModelConfig, UNetConfig, build_model
from quickstep.train.core.checkpoint import save_checkpoint

from quickstep.artifacts import TeacherRef
from tests.helpers import ServerProcess, perturb_zero_init
from tests.serve.conftest import serve

BACKENDS = ("onnxruntime", "torch")
WRONG_SIGMA_DATA = 2.0  # the broken graph's sigma_d (the bundle's model has 0.5)


def digits16_config(sigma_data: float = 0.5, num_classes: int = 10) -> ModelConfig:
    """A tiny UNet for the digits classifier's 1x16x16 input (8 channels, mult (1, 2), no attention)."""
    return ModelConfig(backbone=UNetConfig(img_channels=1, img_resolution=16, model_channels=8, channel_mult=(1, 2),
                                           num_blocks=1, attn_resolutions=(), num_heads=1, num_classes=num_classes),
                       sigma_data=sigma_data, logvar_channels=8)


def digits16_model(sigma_data: float = 0.5, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(digits16_config(sigma_data))
    return perturb_zero_init(model, seed=seed).eval()


def data_config(kind: str, name: str) -> dict:
    return {"kind": kind, "name": name, "train": {"data": {"name": "digits", "resolution": 16}, "seed": 0},
            "data": {"name": "digits", "kind": "image", "shape": [1, 16, 16], "num_classes": 10}}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("report")


@pytest.fixture(scope="module")
def bundle(root: Path) -> Path:
    """A class-conditional 16x16 digits bundle (steps 1, 2) whose config names a local diffusion teacher."""
    from quickstep.export.bundle import export_bundle

    teacher = save_checkpoint(root / "teacher", digits16_model(seed=1), extra_config=data_config("diffusion", "t"))
    extra = {**data_config("consistency", "tiny-digits"), "teacher": TeacherRef.of(teacher).to_json()}
    ckpt = save_checkpoint(root / "ckpt", digits16_model(), extra_config=extra)
    return export_bundle(ckpt, root / "bundle", steps=(1, 2), parity_batches=(1, 3))


@pytest.fixture(scope="module")
def report(bundle: Path, root: Path) -> dict:
    cfg = ReportConfig(backends=BACKENDS, n=200, latency_batches=(1, 8), repeats=3, teacher_steps=18)
    return make_report(bundle, root / "out", cfg)


def _row(report: dict, backend: str, steps: int) -> dict:
    rows = [r for r in report["rows"] if r["backend"] == backend and r["steps"] == steps]
    assert len(rows) == 1, f"expected one {backend} row at {steps} steps, got {len(rows)}"
    return rows[0]


def test_rows_for_every_backend_steps_and_teacher(report: dict, root: Path, bundle: Path) -> None:
    for backend in BACKENDS:
        for steps in (1, 2):
            r = _row(report, backend, steps)
            assert r["nfe"] == steps and r["fd"] > 0 and 0 <= r["class_accuracy"] <= 1
            assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and np.isfinite(r["kid"])
            assert set(r["latency"]) == {"1", "8"}
            assert all(v["latency_ms"] > 0 and v["throughput_img_s"] > 0 for v in r["latency"].values())
    teacher = _row(report, "teacher", 18)
    assert teacher["nfe"] == 35 and teacher["fd"] > 0
    md = (root / "out" / "report.md").read_text()
    assert md.count("| onnxruntime |") == 2 and md.count("| torch |") == 2 and "| teacher |" in md
    assert json.loads((root / "out" / "report.json").read_text())["rows"] == report["rows"]
    assert (root / "out" / "quality_vs_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    q = read_manifest(bundle).to_json()["quality"]
    assert q["backends"]["onnxruntime"]["2"]["fd"] == _row(report, "onnxruntime", 2)["fd"]
    assert q["teacher"]["nfe"] == 35 and q["flagged"] == []
    from quickstep.export.verify import verify_bundle

    assert verify_bundle(bundle, parity=False).ok  # writing the quality section kept every sha256 valid


def test_onnxruntime_and_torch_fd_agree_within_margin(report: dict) -> None:
    spread = report["tolerance"]["seed_spread"]
    for steps in (1, 2):
        ort, ref = _row(report, "onnxruntime", steps), _row(report, "torch", steps)
        margin = max(0.02 * ref["fd"], spread[str(steps)])
        assert ort["fd_margin"] == pytest.approx(margin)
        assert abs(ort["fd"] - ref["fd"]) <= margin and ort["flagged"] is False
        assert len(report["tolerance"]["torch_fd_by_seed"][str(steps)]) == 3 and spread[str(steps)] > 0


def test_tolerance_rule_is_max_of_relative_spread_and_floor() -> None:
    rows = [{"backend": "torch", "steps": 1, "fd": 100.0}, {"backend": "onnxruntime", "steps": 1, "fd": 103.0},
            {"backend": "aoti", "steps": 1, "fd": 101.5}]
    flagged = apply_tolerance(rows, {"1": 1.0}, ReportConfig())  # margin max(2, 1, 0) = 2
    assert [r["backend"] for r in flagged] == ["onnxruntime"] and rows[2]["flagged"] is False
    assert not apply_tolerance(rows, {"1": 3.5}, ReportConfig())  # a wider seed spread widens the margin
    assert not apply_tolerance(rows, {"1": 0.0}, ReportConfig(fd_floor=5.0))


@pytest.fixture(scope="module")
def broken_bundle(bundle: Path, root: Path) -> Path:
    """The bundle with generator_1step.onnx re-exported from the same weights with the wrong sigma_d (re-hashed)."""
    from quickstep.export.onnx import consistency_graph, export_onnx

    broken = root / "broken"
    shutil.copytree(bundle, broken)
    wrong = digits16_model(sigma_data=WRONG_SIGMA_DATA)
    wrong.load_state_dict(digits16_model().state_dict())
    export_onnx(consistency_graph(wrong, 1), broken / "generator_1step.onnx", num_classes=10)
    m = read_manifest(broken)
    m.name = "tiny-digits-broken"
    refresh_files(broken, m)
    return broken


@pytest.fixture(scope="module")
def broken_cli(broken_bundle: Path, root: Path):
    """`quickstep-export report` on the broken bundle (writes its manifest's quality section)."""
    from quickstep.export.cli import app
    from typer.testing import CliRunner

    return CliRunner().invoke(app, ["report", str(broken_bundle), "--out", str(root / "out-broken"), "--backend",
                                    "onnxruntime", "--n", "200", "--steps", "1", "--latency-batches", "1",
                                    "--repeats", "1"])


def test_wrong_sigma_data_graph_is_flagged(broken_cli, broken_bundle: Path) -> None:
    res = broken_cli
    assert res.exit_code == 1, res.output
    assert "FLAGGED" in res.output
    q = read_manifest(broken_bundle).to_json()["quality"]
    e = q["backends"]["onnxruntime"]["1"]
    assert e["flagged"] is True and abs(e["fd"] - e["fd_torch"]) > e["fd_margin"]
    assert q["backends"]["torch"]["1"]["flagged"] is False
    assert q["flagged"] == [{"backend": "onnxruntime", "steps": 1, "fd": e["fd"], "fd_torch": e["fd_torch"],
                             "fd_margin": e["fd_margin"]}]


def test_server_refuses_flagged_backend_unless_forced(broken_cli, broken_bundle: Path, monkeypatch) -> None:
    q = read_manifest(broken_bundle).to_json()["quality"]["backends"]["onnxruntime"]["1"]
    # the report measured onnxruntime on CPU: the gate keys on backend + device, so serve it on CPU (on a GPU host
    # --device auto would pick CUDA, where this CPU measurement does not apply)
    srv = ServerProcess([broken_bundle], args=["--backend", "onnxruntime", "--device", "cpu"])
    try:
        assert srv.wait(60) == 2
    finally:
        srv.stop()
    log = srv.log()
    assert "refusing to serve" in log and "--force" in log
    assert f"{q['fd']:.4g}" in log and f"{q['fd_torch']:.4g}" in log  # both numbers in the message
    from quickstep.serve.bundle import QualityGateError
    from quickstep.serve.settings import ServeSettings

    monkeypatch.setenv("QUICKSTEP_FORCE", "1")
    assert ServeSettings().force is True
    monkeypatch.delenv("QUICKSTEP_FORCE")
    with pytest.raises(QualityGateError):
        serve(bundle=[broken_bundle], device="cpu").__enter__()
    with serve(bundle=[broken_bundle], device="cpu", force=True) as s:
        r = httpx.post(s.url + "/v1/generate", json={"n": 2, "seed": 1, "steps": 1}, timeout=30)
        assert r.status_code == 200
    with serve(bundle=[broken_bundle], backend="torch") as s:  # the torch backend is not flagged
        assert httpx.get(s.url + "/v1/models/tiny-digits-broken", timeout=10).json()["quality"]["flagged"]


def test_models_endpoint_returns_quality_and_report_samples_as_served(bundle: Path, report: dict) -> None:
    from PIL import Image
    from quickstep.export.report import draw_inputs, run_chunks, serve_backend

    with serve(bundle=[bundle], ui=True) as s:
        info = httpx.get(s.url + "/v1/models/tiny-digits", timeout=10).json()
        assert info["quality"] == read_manifest(bundle).to_json()["quality"]
        ui = httpx.get(s.url + "/ui/config", timeout=10).text  # the demo shows the numbers beside the picker
        assert f"{info['quality']['backends']['onnxruntime']['1']['fd']:.4g}" in ui and "Quality as served" in ui
        assert info["quality"]["backends"]["onnxruntime"]["1"]["fd"] == _row(report, "onnxruntime", 1)["fd"]
        png = httpx.post(s.url + "/v1/generate", json={"n": 1, "seed": 7, "steps": 2, "class_label": 0},
                         headers={"Accept": "image/png"}, timeout=30).content
    served = np.asarray(Image.open(io.BytesIO(png)))
    backend = serve_backend(bundle, "onnxruntime", ReportConfig())  # through the contract's runner registry
    noises, labels = draw_inputs(read_manifest(bundle), 2, seed=7, n=1)  # image 0 gets label 0 % 10 = 0
    mine = run_chunks(lambda nz, lb: backend.run(2, nz, lb), noises, labels, 64)
    np.testing.assert_array_equal(mine[0, ..., 0], served)


def test_ui_quality_markdown(report: dict, bundle: Path) -> None:
    from quickstep.serve.ui import quality_markdown

    q = read_manifest(bundle).quality
    md = quality_markdown(q, "onnxruntime")
    fd = q.backends["onnxruntime"]["1"].fd
    assert f"{fd:.4g}" in md and "Teacher (35 NFE)" in md and "| 2 |" in md
    assert "not measured" in quality_markdown(q, "tensorrt")
    assert "No quality report" in quality_markdown(None, "onnxruntime")


def test_teacher_may_be_a_training_run_directory(root: Path, bundle: Path, tmp_path: Path) -> None:
    """`--teacher runs/teacher` (a run directory, as `make pipeline` passes it) resolves to its latest checkpoint."""
    import shutil

    from quickstep.export.report import ReportError, find_teacher

    run = tmp_path / "teacher-run"
    shutil.copytree(root / "teacher", run / "step-0000500")
    shutil.copytree(root / "teacher", run / "step-0001000")
    assert find_teacher(bundle, None, str(run)) == (run / "step-0001000").resolve()
    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(ReportError, match="nor a training run directory"):
        find_teacher(bundle, None, str(tmp_path / "not-a-run"))
