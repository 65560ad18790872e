"""Bundle integrity (`verify`) and the quickstep-export command line: exit codes and messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from quickstep.export.bundle import read_manifest
from quickstep.export.cli import app
from quickstep.export.verify import verify_bundle
from typer.testing import CliRunner

runner = CliRunner()


@pytest.fixture
def bundle_copy(cm_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cm_bundle, tmp_path / "bundle"))


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_verify_clean_bundle_with_parity(bundle_copy: Path) -> None:
    report = verify_bundle(bundle_copy)
    assert report.ok, report.summary()
    assert sorted(report.checked) == sorted(read_manifest(bundle_copy).to_json()["files"])
    assert report.parity["onnxruntime"]["2"].passed and report.parity["onnxruntime"]["denoiser"].passed
    result = _invoke("verify", bundle_copy, "--no-parity")
    assert result.exit_code == 0 and "OK" in result.output


def test_tampered_file_fails_verify(bundle_copy: Path) -> None:
    f = bundle_copy / "generator_1step.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    report = verify_bundle(bundle_copy)
    assert not report.ok
    assert any("generator_1step.onnx: sha256" in x for x in report.failures)
    result = _invoke("verify", bundle_copy)
    assert result.exit_code == 1 and "generator_1step.onnx: sha256" in result.output


def test_missing_and_unlisted_files_fail_verify(bundle_copy: Path) -> None:
    (bundle_copy / "denoiser.onnx").unlink()
    (bundle_copy / "extra.bin").write_bytes(b"x")
    failures = verify_bundle(bundle_copy, parity=False).failures
    assert any("denoiser.onnx: listed in manifest.json but missing" in x for x in failures)
    assert any("extra.bin: present in the bundle but not listed" in x for x in failures)


def test_verify_not_a_bundle(tmp_path: Path) -> None:
    result = _invoke("verify", tmp_path)
    assert result.exit_code == 2 and "has no manifest.json" in result.output


def test_cli_onnx_export_and_report(cm_ckpt: Path, tmp_path: Path) -> None:
    result = _invoke("onnx", "--ckpt", cm_ckpt, "--out", tmp_path / "b", "--steps", "1", "--name", "tiny")
    assert result.exit_code == 0, result.output
    assert "wrote consistency bundle 'tiny'" in result.output and "parity onnxruntime[1]: b1=0" in result.output
    assert read_manifest(tmp_path / "b").to_json()["steps_supported"] == [1]


def test_cli_onnx_export_from_a_run_directory(cm_ckpt: Path, tmp_path: Path) -> None:
    """`--ckpt runs/student` (a trainer run directory, as the README writes it) exports its latest checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(cm_ckpt, run / "step-0000010")
    shutil.copytree(cm_ckpt, run / "step-0000002")
    (run / "step-0000002" / "config.json").write_text("{}")  # an older, unusable one: must not be picked
    result = _invoke("onnx", "--ckpt", run, "--out", tmp_path / "b", "--steps", "1", "--name", "tiny")
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "b").to_json()["steps_supported"] == [1]
    empty = tmp_path / "empty-run"
    empty.mkdir()
    result = _invoke("onnx", "--ckpt", empty, "--out", tmp_path / "c")
    assert result.exit_code == 2 and "holds no checkpoint" in result.output, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "3"], "consistency bundles support steps [1, 2]; got [3]"),
        (["--opset", "11"], "unsupported ONNX opset 11; supported opsets are [17, 18, 19, 20, 21]"),
        (["--steps", "one"], "--steps takes comma-separated integers"),
        (["--kind", "gan"], "kind must be one of ['consistency', 'diffusion']"),
    ],
)
def test_cli_onnx_bad_arguments(cm_ckpt: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = _invoke("onnx", "--ckpt", cm_ckpt, "--out", tmp_path / "b", *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "b").exists()


def test_cli_missing_checkpoint(tmp_path: Path) -> None:
    result = _invoke("onnx", "--ckpt", tmp_path / "nope", "--out", tmp_path / "b")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_cli_corrupt_checkpoint(cm_ckpt: Path, tmp_path: Path) -> None:
    bad = Path(shutil.copytree(cm_ckpt, tmp_path / "bad"))
    (bad / "model.safetensors").write_bytes(b"\x80\x04not safetensors")
    result = _invoke("onnx", "--ckpt", bad, "--out", tmp_path / "b")
    assert result.exit_code == 2 and "refusing to unpickle" in result.output


def test_cli_tensorrt_without_tensorrt_or_gpu(cm_bundle: Path) -> None:
    try:
        from quickstep.export.tensorrt import import_tensorrt

        import_tensorrt()
        pytest.skip("TensorRT and a GPU are available here")
    except Exception:  # noqa: BLE001 - the point is that it is unavailable
        pass
    result = _invoke("tensorrt", "--bundle", cm_bundle, "--batch", "1,8")
    assert result.exit_code == 2
    assert "TensorRT is not available" in result.output or "no CUDA GPU" in result.output


def test_cli_aoti_bad_device(cm_bundle: Path) -> None:
    result = _invoke("aoti", "--bundle", cm_bundle, "--device", "tpu")
    assert result.exit_code == 2 and "device must be one of ['cpu', 'cuda']" in result.output


def test_rewritten_manifest_stays_world_readable(bundle_copy: Path) -> None:
    """report/annotate rewrite manifest.json atomically; the server may run as another user, so it stays 0644."""
    import stat

    from quickstep.export.bundle import write_manifest

    write_manifest(bundle_copy, read_manifest(bundle_copy))
    assert stat.S_IMODE((bundle_copy / "manifest.json").stat().st_mode) == 0o644
