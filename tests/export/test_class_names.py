"""[issue 23] Class names travel from the checkpoint's config.json into the bundle manifest, GET /v1/models and the
UI's class dropdown (index-aligned; null when the data named none)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from quickstep.export.bundle import export_bundle
from quickstep.serve.bundle import load_bundle
from quickstep.serve.ui import RANDOM_CLASS, _class_choices

from quickstep.artifacts import BundleError, BundleManifest
from tests.helpers import tiny_checkpoint


def test_class_names_reach_the_manifest_and_the_served_bundle(tmp_path):
    ckpt = tiny_checkpoint(tmp_path, num_classes=3)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["data"]["class_names"] = ["cat", "dog", "emu"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = export_bundle(ckpt, tmp_path / "bundle", steps=(1,), parity_batches=(1,))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["class_names"] == ["cat", "dog", "emu"] and manifest["class_aliases"] == {}
    b = load_bundle(out)
    assert list(b.class_names) == ["cat", "dog", "emu"]
    assert _class_choices(3, b.class_names) == [RANDOM_CLASS, ("0: cat", "0"), ("1: dog", "1"), ("2: emu", "2")]
    assert _class_choices(2, ["0", "1"]) == [RANDOM_CLASS, ("0", "0"), ("1", "1")]  # digits: no "7: 7"
    assert _class_choices(2) == [RANDOM_CLASS, "0", "1"]
    import httpx

    from tests.serve.conftest import serve

    with serve(bundle=[out]) as srv:
        info = httpx.get(srv.url + "/v1/models").json()["models"][0]
    assert info["class_names"] == ["cat", "dog", "emu"] and info["num_classes"] == 3


def test_class_names_must_be_one_string_per_class():
    raw = json.loads((Path(__file__).resolve().parents[2] / "serve" / "bundled" / "digits-direct-cm" / "manifest.json")
                     .read_text())
    BundleManifest.from_json(raw)
    with pytest.raises(BundleError, match="class_names has 1 names for num_classes 10"):
        BundleManifest.from_json({**raw, "class_names": ["a"]})
    with pytest.raises(BundleError, match="class_aliases must map"):
        BundleManifest.from_json({**raw, "class_aliases": {"eleven": 11}})
