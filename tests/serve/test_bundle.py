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
