"""Issue 17: the 2-step sampler's times are a property of the model: checkpoint -> export manifest and ONNX graph
-> both serving backends."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from quickstep.export.bundle import export_bundle
from quickstep.serve.backends.base import create_backend
from quickstep.serve.bundle import load_bundle
from quickstep.serve.service import draw_noise
from quickstep.serve.settings import ServeSettings
from quickstep.train.core import checkpoint as ckpt
from quickstep.train.core.generator import ConsistencyGenerator
from quickstep.train.core.trigflow import T_MID, t_max

from tests.helpers import tiny_checkpoint

T_CHOSEN = 0.55


def test_recorded_times_travel_from_checkpoint_to_manifest_graph_and_server(tmp_path):
    path = tiny_checkpoint(tmp_path / "ckpt", kind="consistency")
    assert ckpt.recorded_times(ckpt.load_config(path)) == {}
    tm = t_max()
    ckpt.record_times(path, {2: [tm, T_CHOSEN]})
    assert ckpt.recorded_times(ckpt.load_config(path)) == {2: [tm, T_CHOSEN]}
    bundle = export_bundle(path, tmp_path / "bundle", steps=(1, 2))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["times"]["2"] == pytest.approx([tm, T_CHOSEN])
    assert manifest["times"]["1"] == pytest.approx([tm])
    b = load_bundle(bundle)
    assert b.times[2] == pytest.approx([tm, T_CHOSEN])
    noises = draw_noise(3, 4, b.image_shape, 2)
    model = ckpt.load_model(path)
    x = [torch.from_numpy(n) for n in noises]
    with torch.no_grad():
        want = ConsistencyGenerator(model, 2, ts=[tm, T_CHOSEN])(*x).numpy()
        default = ConsistencyGenerator(model, 2)(*x).numpy()
    assert np.abs(want.astype(int) - default.astype(int)).max() > 1  # the time matters for these weights
    for backend in ("onnxruntime", "torch"):  # the ONNX graph bakes it in; the torch backend reads the manifest
        be = create_backend(b, ServeSettings(backend=backend, device="cpu", max_batch=4))
        be.load()
        got = be.run(2, noises, None)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, backend


def test_record_times_validates_and_merges(tmp_path):
    path = tiny_checkpoint(tmp_path / "ckpt", kind="consistency")
    tm = t_max()
    with pytest.raises(ckpt.CheckpointFormatError, match="decreasing"):
        ckpt.record_times(path, {2: [0.5, 1.0]})
    with pytest.raises(ckpt.CheckpointFormatError, match="decreasing"):
        ckpt.record_times(path, {2: [tm]})
    ckpt.record_times(path, {1: [tm]})
    ckpt.record_times(path, {2: [tm, T_MID]})
    assert ckpt.recorded_times(ckpt.load_config(path)) == {1: [tm], 2: [tm, T_MID]}
    ckpt.load_model(path)  # weights untouched
