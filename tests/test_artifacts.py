"""The artefact contract (quickstep.artifacts): typed checkpoint/bundle metadata, migration of format 1, errors
that name the format version, the noise convention, and no absolute machine paths."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quickstep.artifacts import (
    BUNDLE_FORMAT_VERSION,
    CHECKPOINT_FORMAT_VERSION,
    GENERATORS,
    RUNNERS,
    ArtifactError,
    BundleError,
    BundleManifest,
    CheckpointMeta,
    ParityEntry,
    TeacherRef,
    draw_labels,
    draw_noise,
    find_entry_point,
    migrate_checkpoint,
    migrate_manifest,
    plan_tag,
)

BUNDLED = Path(__file__).resolve().parents[1] / "serve" / "bundled" / "digits-direct-cm"


def test_the_contract_imports_nothing_heavy():
    code = ("import sys, quickstep.artifacts; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'fastapi', 'quickstep.train', 'quickstep.serve', "
            "'quickstep.export') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _v1_checkpoint(objectives, teacher=None) -> dict:
    raw = {"format": "quickstep-checkpoint", "format_version": 1, "model": {"backbone": {"kind": "mlp", "dim": 2}},
           "objectives": objectives, "step": 3}
    if teacher is not None:
        raw["teacher"] = teacher
    return raw


@pytest.mark.parametrize("objectives,kind,sampler", [
    (["scd"], "consistency", "consistency"), (["sct"], "consistency", "consistency"),
    (["direct_cm"], "consistency", "consistency"), (["cd"], "consistency", "consistency"),
    (["diffusion", "cp"], "diffusion", "heun"), (["stf"], "diffusion", "heun"), ([], "diffusion", "heun"),
])
def test_format_1_checkpoints_migrate_with_their_kind(objectives, kind, sampler):
    meta = CheckpointMeta.from_json(_v1_checkpoint(objectives))
    assert meta.format_version == CHECKPOINT_FORMAT_VERSION == 2
    assert meta.kind == kind and meta.sampler.name == sampler and meta.step == 3
    # a format 1 config written with train.objectives only (no top-level list) reads the same
    raw = _v1_checkpoint([])
    raw["train"] = {"objectives": {o: {} for o in objectives}}
    assert CheckpointMeta.from_json(raw).kind == kind


def test_format_1_model_section_gets_the_defaults_of_its_day():
    meta = CheckpointMeta.from_json(_v1_checkpoint(["stf"]))
    assert meta.model["sigma_data"] == 0.5 and meta.model["logvar_channels"] == 64
    raw = _v1_checkpoint(["stf"])
    raw["model"] = {**raw["model"], "sigma_data": 1.3, "logvar_channels": 0}  # values it wrote are kept
    assert CheckpointMeta.from_json(raw).model["sigma_data"] == 1.3
    assert CheckpointMeta.from_json(raw).model["logvar_channels"] == 0
    # a current (format 2) section is read as written: nothing is filled in
    raw2 = {**_v1_checkpoint(["stf"]), "format_version": 2, "kind": "diffusion"}
    assert "sigma_data" not in CheckpointMeta.from_json(raw2).model


def test_format_1_teacher_path_is_not_carried_over():
    meta = CheckpointMeta.from_json(_v1_checkpoint(["scd"], {"path": "/work/main/runs/t/step-1", "sha256": "ab"}))
    assert meta.teacher == TeacherRef(sha256="ab", ref=None)
    assert "/work" not in json.dumps(meta.to_json())
    rel = CheckpointMeta.from_json(_v1_checkpoint(["scd"], {"path": "runs/t/step-1", "sha256": "ab"}))
    assert rel.teacher == TeacherRef(sha256="ab", ref="runs/t/step-1")


def test_unknown_versions_fail_naming_the_version():
    raw = {**_v1_checkpoint(["scd"]), "format_version": 7}
    with pytest.raises(ArtifactError, match="checkpoint format_version 7 is not supported.*versions 1 and 2"):
        migrate_checkpoint(raw)
    m = json.loads((BUNDLED / "manifest.json").read_text())
    with pytest.raises(BundleError, match="format_version 3 is not supported.*versions 1 and 2"):
        migrate_manifest({**m, "format_version": 3})
    with pytest.raises(ArtifactError, match="format 'other'"):
        migrate_checkpoint({**raw, "format": "other"})


def test_new_artefacts_refuse_absolute_teacher_paths():
    with pytest.raises(ValueError, match="absolute path"):
        TeacherRef(sha256="ab", ref="/home/me/teacher")
    with pytest.raises(ArtifactError, match="teacher.ref.*absolute path"):
        CheckpointMeta.from_json({"format_version": 2, "model": {}, "kind": "diffusion",
                                  "teacher": {"sha256": "ab", "ref": "C:\\runs\\t"}})


def test_kind_is_required_and_validated():
    with pytest.raises(ArtifactError, match="lacks the required key 'kind'"):
        CheckpointMeta.from_json({"format_version": 2, "model": {}})
    meta = CheckpointMeta.from_json({"format_version": 2, "model": {}, "kind": "consistency"})
    assert meta.sampler.name == "consistency" and meta.sampler.default_steps == 1


def test_format_1_bundle_migrates(tmp_path):
    """The bundle as shipped before the contract (format 1, absolute teacher path) loads; the path is dropped."""
    m = json.loads((BUNDLED / "manifest.json").read_text())
    m["format_version"] = 1
    m["teacher"] = {"path": "/work/main/runs/bundle-teacher/step-0004000", "sha256": m["teacher"]["sha256"]}
    m["quality"]["teacher"]["checkpoint"] = "/work/main/runs/bundle-teacher/step-0004000"
    out = BundleManifest.from_json(m)
    assert out.format_version == BUNDLE_FORMAT_VERSION and out.teacher.ref is None
    assert out.quality.teacher.checkpoint is None and out.quality.teacher.nfe == 35
    assert "/work" not in json.dumps(out.to_json())


def test_bundled_manifest_round_trips_and_records_no_machine_path(tmp_path):
    m = BundleManifest.read(BUNDLED)
    assert m.kind == "consistency" and m.graph(2).noise_inputs == ("noise", "noise2") and m.graph(1).has_labels
    assert m.teacher.ref == "runs/bundle-teacher/step-0004000"
    assert m.quality.backends["onnxruntime"]["1"].device == "onnxruntime (CPUExecutionProvider)"
    assert m.provenance["runs"]["teacher"]["steps"] == 4000  # keys the contract does not declare are kept
    raw = json.loads((BUNDLED / "manifest.json").read_text())
    assert m.to_json() == raw
    for text in ((BUNDLED / "manifest.json").read_text(), (BUNDLED / "config.json").read_text()):
        assert '"/work' not in text and '"/home' not in text and '"/tmp' not in text
    meta = CheckpointMeta.read(BUNDLED)
    # the 2-step times the student's eval sweep recorded in the checkpoint are the ones the bundle serves
    assert meta.kind == "consistency" and meta.teacher == m.teacher
    assert [meta.sampler.times["2"]] == [raw["times"]["2"]] and 0.0 < raw["times"]["2"][1] < raw["times"]["2"][0]
    shutil.copytree(BUNDLED, tmp_path / "b")
    m.write(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "manifest.json").read_text()) == raw


def test_draw_noise_is_the_documented_convention():
    n1, n2 = draw_noise(7, 3, (1, 4, 4), 2)
    for k in range(3):
        rng = np.random.default_rng([7, k])
        np.testing.assert_array_equal(n1[k], rng.standard_normal((1, 4, 4), dtype=np.float32))
        np.testing.assert_array_equal(n2[k], rng.standard_normal((1, 4, 4), dtype=np.float32))
        assert draw_labels(7, 3, 10, 2, (1, 4, 4))[k] == rng.integers(0, 10)


def test_plan_tag():
    assert plan_tag("NVIDIA A100-SXM4-80GB", "10.13.3") == "NVIDIA_A100_SXM4_80GB.trt10.13.3"


def test_stages_reach_each_other_through_entry_points():
    """export runs the serve backends (quickstep.runners) and serve runs train.core's generator modules
    (quickstep.generators) without importing each other; an absent entry point names what is installed."""
    from quickstep.serve.backends.base import open_runner
    from quickstep.train.core.generator import bundle_generators

    assert find_entry_point(GENERATORS, "torch", "") is bundle_generators
    assert all(find_entry_point(RUNNERS, b, "") is open_runner for b in ("onnxruntime", "tensorrt", "torch", "aoti"))
    with pytest.raises(ArtifactError, match=r"'jax'.*installed: \['torch'\].*the hint"):
        find_entry_point(GENERATORS, "jax", "the hint")


def test_parity_quality_and_tensorrt_sections_are_typed_and_keep_their_json():
    """The manifest's parity, quality tolerance/flags and TensorRT builds are typed; their JSON (keys and key order:
    one max_abs_err_b{N} per batch size) is what export wrote before they were, and empty sections stay empty."""
    raw = json.loads((BUNDLED / "manifest.json").read_text())
    trt = {"units": "uint8 levels", "reference": "onnxruntime", "max_abs_err_b1": 0.0, "max_abs_err_b32": 1.0,
           "tolerance": 2.0, "passed": True, "build_s": 30.1}
    raw["parity"]["tensorrt"] = {"H200.trt10.13.3": {"1": trt}}
    raw["tensorrt"] = {"H200.trt10.13.3": {"trt_version": "10.13.3", "batch_buckets": [1, 8, 32],
                                          "strongly_typed": True, "precision": "fp32"}}
    raw["quality"]["flagged"] = [{"backend": "onnxruntime", "steps": 1, "fd": 3.0, "fd_torch": 1.0, "fd_margin": 0.5}]
    m = BundleManifest.from_json(raw)
    ort = m.parity.entry("onnxruntime", "denoiser")
    assert ort.units == "relative max abs" and set(ort.max_abs_err) == {1, 7} and ort.passed
    assert m.parity_tolerance("onnxruntime", "1") == 1.0 and m.parity_tolerance("aoti", "1") is None
    assert m.parity.tensorrt["H200.trt10.13.3"]["1"].worst == 1.0 and m.tensorrt["H200.trt10.13.3"].batch_buckets[-1] == 32
    assert m.quality.tolerance.seed_spread["1"] > 0 and m.quality.flagged[0].fd_margin == 0.5
    out = m.to_json()
    assert out == raw and list(out["parity"]["tensorrt"]["H200.trt10.13.3"]["1"]) == list(trt)
    assert list(out["parity"]["onnxruntime"]["1"]) == ["units", "max_abs_err_b1", "max_abs_err_b7", "tolerance", "passed"]
    m.parity.record("aoti", "1", ParityEntry(units="uint8 levels", max_abs_err={1: 0.0}, tolerance=1.0, passed=True)
                    .with_extra(compile_s=12.5))
    assert m.to_json()["parity"]["aoti"] == {"1": {"units": "uint8 levels", "max_abs_err_b1": 0.0, "tolerance": 1.0,
                                                   "passed": True, "compile_s": 12.5}}
    bare = BundleManifest.from_json({**raw, "parity": {}, "quality": {**raw["quality"], "tolerance": {}, "flagged": []}})
    assert bare.to_json()["parity"] == {} and bare.to_json()["quality"]["tolerance"] == {}
