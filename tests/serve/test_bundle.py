"""Bundle loading: manifest validation, sha256 verification, the bundled-default message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from quickstep.serve import bundle as bundle_mod
from quickstep.serve.bundle import BundleError, discover_bundles, load_bundle


def test_load_bundle_reads_manifest(cond_bundle_dir):
    b = load_bundle(cond_bundle_dir)
    assert b.kind == "consistency" and b.image_shape == (1, 8, 8) and b.num_classes == 10
    assert b.steps_supported == (1, 2) and b.default_steps == 1
    assert b.graphs[1].noise_inputs == ("noise",) and b.graphs[2].noise_inputs == ("noise", "noise2")
    assert b.graphs[1].has_labels and b.graph_file(2, "onnx", "ONNX").name == "generator_2step.onnx"
    with pytest.raises(BundleError, match="no AOTInductor package for steps=1"):
        b.graph_file(1, "aoti", "AOTInductor package")


@pytest.fixture
def copy(cond_bundle_dir, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(cond_bundle_dir, dst)
    return dst


def test_corrupt_file_refused(copy):
    f = copy / "generator_1step.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"corrupt.*generator_1step\.onnx.*sha256"):
        load_bundle(copy)
    load_bundle(copy, verify=False)  # explicit opt-out still parses


def test_truncated_and_missing_files_refused(copy):
    (copy / "generator_2step.onnx").write_bytes(b"short")
    (copy / "config.json").unlink()
    with pytest.raises(BundleError) as e:
        load_bundle(copy)
    assert "generator_2step.onnx" in str(e.value) and "truncated" in str(e.value)
    assert "'config.json': missing" in str(e.value)


@pytest.mark.parametrize("mutate,match", [
    (lambda m: m.update(format="other"), "not a quickstep bundle"),
    (lambda m: m.update(format_version=99), "format_version 99"),
    (lambda m: m.update(kind="gan"), "kind must be"),
    (lambda m: m.update(steps_supported=[1, 2, 4]), "without graphs"),
    (lambda m: m.update(default_steps=3), "default_steps 3"),
    (lambda m: m.pop("graphs"), "'graphs'"),
    (lambda m: m.update(files={}), "lists no files"),
    (lambda m: m["files"].update({"../evil": {"sha256": "0"}}), "escapes"),
])
def test_bad_manifest(copy, mutate, match):
    mf = copy / "manifest.json"
    m = json.loads(mf.read_text())
    mutate(m)
    mf.write_text(json.dumps(m))
    with pytest.raises(BundleError, match=match):
        load_bundle(copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="holds no bundle"):
        discover_bundles(tmp_path)


def test_discover_and_bundled_default(cond_bundle_dir, tmp_path, monkeypatch):
    assert discover_bundles(cond_bundle_dir.parent) == [cond_bundle_dir]
    monkeypatch.setattr(bundle_mod, "BUNDLED_DIR", tmp_path / "bundled")
    with pytest.raises(BundleError, match="bundled default model is not installed.*--bundle"):
        bundle_mod.bundled_default()
    (tmp_path / "bundled").mkdir()
    shutil.copytree(cond_bundle_dir, tmp_path / "bundled" / "digits")
    assert bundle_mod.bundled_default() == tmp_path / "bundled" / "digits"


# ----------------------------------------------------------------------------------------------- quality gate
CPU_EP, CUDA_EP = "onnxruntime (CPUExecutionProvider)", "onnxruntime (CUDAExecutionProvider)"  # as recorded


def dev(text: str):
    from quickstep.serve.device import Device

    return Device.parse(text)


def flagged_bundle(src: Path, dst: Path, device: str | None) -> Path:
    """A copy of `src` whose quality report flags onnxruntime at steps 1, measured on `device` (None: unrecorded)."""
    shutil.copytree(src, dst)
    mf = dst / "manifest.json"
    m = json.loads(mf.read_text())
    entry = {"fd": 250.0, "fd_torch": 170.0, "fd_margin": 5.0, "flagged": True}
    if device is not None:
        entry["device"] = device
    m["quality"] = {"backends": {"onnxruntime": {"1": entry},
                                 "torch": {"1": {"fd": 170.0, "flagged": False, "device": "torch (cpu)"}}}}
    mf.write_text(json.dumps(m))
    return dst


def test_quality_gate_keys_on_backend_and_device(copy, tmp_path, caplog):
    from quickstep.serve.bundle import QualityGateError, check_quality_gate

    cpu = load_bundle(flagged_bundle(copy, tmp_path / "cpu", CPU_EP))
    with pytest.raises(QualityGateError, match=r"FD 250 at steps=1.*on onnxruntime \(CPUExecutionProvider\)"):
        check_quality_gate(cpu, "onnxruntime", device=dev(CPU_EP))
    with pytest.raises(QualityGateError):
        check_quality_gate(cpu, "onnxruntime")  # no device known: the backend name alone
    assert "serving it anyway" in check_quality_gate(cpu, "onnxruntime", force=True, device=dev(CPU_EP))
    assert check_quality_gate(cpu, "torch", device=dev("torch (cpu)")) is None
    caplog.clear()
    with caplog.at_level("WARNING", logger="quickstep.serve"):
        assert check_quality_gate(cpu, "onnxruntime", device=dev(CUDA_EP)) is None  # measured on CPU, served on CUDA
    note = caplog.text
    assert "CPUExecutionProvider" in note and "CUDAExecutionProvider" in note and "does not apply" in note
    legacy = load_bundle(flagged_bundle(copy, tmp_path / "legacy", None))
    with pytest.raises(QualityGateError):  # an entry without a device gates every device
        check_quality_gate(legacy, "onnxruntime", device=dev(CUDA_EP))


def test_server_gates_on_the_device_it_runs_on(copy, tmp_path):
    """On this (CPU) server: a flag measured on CUDA does not refuse; one measured on CPU does."""

    from quickstep.serve.app import create_app
    from quickstep.serve.bundle import QualityGateError
    from quickstep.serve.settings import ServeSettings

    cuda_flag = flagged_bundle(copy, tmp_path / "cuda", CUDA_EP)
    app = create_app(ServeSettings(bundle=[cuda_flag], device="cpu", ui=False))
    assert app.state.service.models[load_bundle(cuda_flag).name].gated_on == dev(CPU_EP)
    with pytest.raises(QualityGateError, match="refusing to serve"):
        create_app(ServeSettings(bundle=[flagged_bundle(copy, tmp_path / "cpu", CPU_EP)], device="cpu", ui=False))


def test_quality_gate_rechecked_when_the_backend_falls_back(copy, tmp_path, monkeypatch):
    """Planned on CUDA (not flagged there) but onnxruntime fell back to CPU (flagged): the model does not go ready."""
    import asyncio

    from quickstep.serve.backends.onnxruntime import OnnxRuntimeBackend
    from quickstep.serve.metrics import ServeMetrics
    from quickstep.serve.service import GenerationService
    from quickstep.serve.settings import ServeSettings

    b = load_bundle(flagged_bundle(copy, tmp_path / "cpu", CPU_EP))
    monkeypatch.setattr(OnnxRuntimeBackend, "planned_device", lambda self: dev(CUDA_EP))
    service = GenerationService([b], ServeSettings(device="cpu", ui=False), ServeMetrics())
    rt = service.models[b.name]
    assert rt.gated_on == dev(CUDA_EP)

    async def main():
        await service.load_all()
        await service.close()

    asyncio.run(main())
    assert not rt.ready and rt.error and "QualityGateError" in rt.error and rt.gated_on == dev(CPU_EP)


def test_device_is_a_value_with_a_display_form():
    from quickstep.serve.device import Device

    for text, kind in ((CPU_EP, "cpu"), (CUDA_EP, "cuda"), ("onnxruntime (TensorrtExecutionProvider)", "cuda"),
                       ("torch (cuda)", "cuda"), ("aoti (cpu)", "cpu")):
        d = Device.parse(text)
        assert d.kind == kind and str(d) == text and Device.parse(str(d)) == d
    assert Device.parse(" ONNXRUNTIME ( cudaexecutionprovider ) ") == dev(CUDA_EP)  # recorded by hand
    assert dev("torch (cpu)") != dev(CPU_EP) and dev("torch (cpu)") != dev("torch (cuda)")
    with pytest.raises(ValueError, match="not a device description"):
        Device.parse("a GPU")
