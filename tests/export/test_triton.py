"""Triton model repositories: config.pbtxt parses as ModelConfig protobuf text and matches the ONNX graph."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from quickstep.export.cli import app
from quickstep.export.onnx import ExportError
from quickstep.export.triton import check_against_onnx, parse_model_config, write_triton_repository
from typer.testing import CliRunner


def test_repository_layout_and_configs(cm_bundle: Path, tmp_path: Path) -> None:
    models = write_triton_repository(cm_bundle, tmp_path / "repo", max_batch=16)
    assert set(models) == {"tiny-consistency-cond_1step", "tiny-consistency-cond_2step",
                           "tiny-consistency-cond_denoiser"}
    for name, d in models.items():
        cfg = parse_model_config((d / "config.pbtxt").read_text())
        onnx_file = d / "1" / "model.onnx"
        assert onnx_file.is_file() and cfg.name == name and d.name == name
        assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
        assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds == 2000
        assert check_against_onnx(cfg, onnx_file) == []
    cfg = parse_model_config((models["tiny-consistency-cond_2step"] / "config.pbtxt").read_text())
    ins = {i.name: i for i in cfg.input}
    assert list(ins) == ["noise", "noise2", "class_labels"]
    assert list(ins["noise"].dims) == [1, 8, 8]  # no batch axis
    assert list(ins["class_labels"].dims) == [1] and ins["class_labels"].HasField("reshape")
    assert list(cfg.output[0].dims) == [8, 8, 1] and cfg.output[0].name == "images"


def test_validator_catches_mismatches(cm_bundle: Path, tmp_path: Path) -> None:
    d = write_triton_repository(cm_bundle, tmp_path / "repo", include_denoiser=False)["tiny-consistency-cond_1step"]
    text = (d / "config.pbtxt").read_text()
    cfg = parse_model_config(text.replace('name: "noise"', 'name: "latents"'))
    assert any("inputs" in p for p in check_against_onnx(cfg, d / "1" / "model.onnx"))
    cfg = parse_model_config(text.replace("dims: [ 1, 8, 8 ]", "dims: [ 1, 16, 16 ]"))
    assert any("per-sample dims" in p for p in check_against_onnx(cfg, d / "1" / "model.onnx"))
    with pytest.raises(text_format.ParseError):
        parse_model_config(text + "\nmax_batch: 4\n")  # unknown field
    with pytest.raises(text_format.ParseError):
        parse_model_config(text.replace("TYPE_FP32", "TYPE_FLOAT"))  # unknown enum value


def test_diffusion_repository_and_tensorrt_without_plans(dm_bundle: Path, tmp_path: Path) -> None:
    models = write_triton_repository(dm_bundle, tmp_path / "repo", instance_kind="cpu", include_denoiser=False)
    (name, d), = models.items()
    assert name == "tiny-diffusion_heun2"
    cfg = parse_model_config((d / "config.pbtxt").read_text())
    assert cfg.instance_group[0].kind == 2  # KIND_CPU
    with pytest.raises(ExportError, match="no TensorRT plans"):
        write_triton_repository(dm_bundle, tmp_path / "repo2", backend="tensorrt")


def test_cli_triton(cm_bundle: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["triton", "--bundle", str(cm_bundle), "--out", str(tmp_path / "r"),
                                      "--backend", "onnx"])
    assert result.exit_code == 2 and "backend must be one of ['onnxruntime', 'tensorrt']" in result.output
    result = CliRunner().invoke(app, ["triton", "--bundle", str(cm_bundle), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0 and f"tritonserver --model-repository={tmp_path / 'r'}" in result.output
