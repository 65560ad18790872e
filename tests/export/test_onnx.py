"""ONNX bundles: layout, manifest, onnxruntime parity with the torch samplers, the parity gate, kind detection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from quickstep.export.bundle import MANIFEST, check_kind, export_bundle, read_manifest, sha256_file
from quickstep.export.onnx import ExportError, ParityError, ort_session
from quickstep.train.core.checkpoint import load_model, save_checkpoint
from quickstep.train.core.generator import ConsistencyGenerator, DenoiserGraph, HeunGenerator
from quickstep.train.core.model import build_model
from quickstep.train.core.networks import MLPConfig, ModelConfig

from quickstep.artifacts import CheckpointMeta


def _serving_noise(seed: int, n: int, steps: int, shape=(1, 8, 8)) -> list[np.ndarray]:
    """The documented noise convention: image k uses default_rng([seed, k]); noise, then noise2."""
    per_image = []
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        per_image.append([rng.standard_normal(shape, dtype=np.float32) for _ in range(steps)])
    return [np.stack([p[s] for p in per_image]) for s in range(steps)]


def test_consistency_bundle_layout_and_manifest(cm_bundle: Path) -> None:
    m = read_manifest(cm_bundle).to_json()
    files = {p.name for p in cm_bundle.iterdir()}
    assert files == {MANIFEST, "generator_1step.onnx", "generator_2step.onnx", "denoiser.onnx",
                     "weights.onnx.data", "model.safetensors", "config.json"}
    assert m["kind"] == "consistency" and m["steps_supported"] == [1, 2] and m["default_steps"] == 1
    assert m["image_shape"] == [1, 8, 8] and m["num_classes"] == 10 and m["opset"] == 17
    assert m["times"]["1"] == pytest.approx([np.arctan(80 / 0.5)]) and m["times"]["2"][1] == pytest.approx(1.1)
    assert [i["name"] for i in m["graphs"]["2"]["inputs"]] == ["noise", "noise2", "class_labels"]
    assert m["graphs"]["1"]["outputs"] == [{"name": "images", "dtype": "uint8", "shape": ["batch", 8, 8, 1]}]
    assert set(m["files"]) == files - {MANIFEST}
    for name, meta in m["files"].items():
        assert meta["sha256"] == sha256_file(cm_bundle / name)
    for key in ("1", "2", "denoiser"):
        entry = m["parity"]["onnxruntime"][key]
        assert entry["passed"] and {"max_abs_err_b1", "max_abs_err_b7"} <= set(entry)
    assert m["parity"]["onnxruntime"]["1"]["max_abs_err_b7"] <= 1


def test_graphs_share_one_deduplicated_weights_file(cm_bundle: Path) -> None:
    """The three graphs hold the same network: its weights are stored once, in weights.onnx.data, and every
    large initializer of every graph points into it (page-aligned); the file is about one copy of the weights."""
    from onnx.external_data_helper import uses_external_data
    from quickstep.train.core.checkpoint import load_weights

    info = read_manifest(cm_bundle).to_json()["onnx_external_data"]
    data = (cm_bundle / "weights.onnx.data").stat().st_size
    assert info["file"] == "weights.onnx.data" and info["data_bytes"] == data
    assert info["tensors"] >= 3 * info["unique"] > 0  # 1 step + 2 steps (unrolled twice) + denoiser
    ema_bytes = sum(v.numel() * 4 for k, v in load_weights(cm_bundle).items())
    assert data < 1.5 * ema_bytes + 4096 * info["unique"]
    for name in ("generator_1step.onnx", "generator_2step.onnx", "denoiser.onnx"):
        g = onnx.load(str(cm_bundle / name), load_external_data=False).graph
        ext = [t for t in g.initializer if uses_external_data(t)]
        assert ext and all(dict((e.key, e.value) for e in t.external_data)["location"] == "weights.onnx.data"
                           for t in ext)
        assert all(int(dict((e.key, e.value) for e in t.external_data)["offset"]) % 4096 == 0 for t in ext)
        assert not any(t.raw_data for t in ext)


def test_onnx_graph_has_dynamic_batch_and_declared_io(cm_bundle: Path) -> None:
    g = onnx.load(str(cm_bundle / "generator_2step.onnx")).graph
    ins = {v.name: v.type.tensor_type for v in g.input}
    assert list(ins) == ["noise", "noise2", "class_labels"]
    assert ins["noise"].elem_type == onnx.TensorProto.FLOAT and ins["class_labels"].elem_type == onnx.TensorProto.INT64
    assert ins["noise"].shape.dim[0].dim_param == "batch"
    assert g.output[0].name == "images" and g.output[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


@pytest.mark.parametrize("steps", [1, 2])
def test_onnxruntime_equals_torch_consistency_generator(cm_bundle: Path, cm_ckpt: Path, steps: int) -> None:
    gen = ConsistencyGenerator(load_model(cm_ckpt), steps).eval()
    sess = ort_session(cm_bundle / f"generator_{steps}step.onnx")
    for batch in (1, 7):
        noises = _serving_noise(seed=42, n=batch, steps=steps)
        labels = np.arange(batch, dtype=np.int64) % 10
        feeds = {"noise": noises[0], "class_labels": labels}
        if steps == 2:
            feeds["noise2"] = noises[1]
        got = sess.run(None, feeds)[0]
        with torch.no_grad():
            ref = gen(*[torch.from_numpy(n) for n in noises], torch.from_numpy(labels)).numpy()
        assert got.dtype == np.uint8 and got.shape == (batch, 8, 8, 1)
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
        assert ref.std() > 5  # non-trivial images, so the comparison means something
    # image 0 does not depend on what else is in the batch
    one = sess.run(None, {k: v[:1] for k, v in feeds.items()})[0]
    assert np.array_equal(one[0], got[0])


def test_denoiser_onnx_float_parity(cm_bundle: Path, cm_ckpt: Path) -> None:
    model = load_model(cm_ckpt)
    rng = np.random.default_rng(0)
    x = (0.5 * rng.standard_normal((5, 1, 8, 8))).astype(np.float32)
    t = rng.uniform(0.1, 1.5, 5).astype(np.float32)
    y = np.array([0, 1, 2, 3, 10], dtype=np.int64)  # 10 = the null label
    got = ort_session(cm_bundle / "denoiser.onnx").run(None, {"x_t": x, "t": t, "class_labels": y})[0]
    with torch.no_grad():
        ref = DenoiserGraph(model)(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_diffusion_bundle_heun_graph(dm_bundle: Path, dm_ckpt: Path) -> None:
    m = read_manifest(dm_bundle).to_json()
    assert m["kind"] == "diffusion" and m["steps_supported"] == [2] and m["nfe"] == {"2": 3}
    assert m["graphs"]["2"]["onnx"] == "generator_heun2.onnx" and m["denoiser"]["onnx"] == "denoiser.onnx"
    assert [i["name"] for i in m["graphs"]["2"]["inputs"]] == ["noise"]  # unconditional: no labels input
    assert m["sigmas"]["2"][0] == pytest.approx(80.0) and m["sigmas"]["2"][-1] == 0.0
    noise = _serving_noise(seed=7, n=7, steps=1)[0]
    got = ort_session(dm_bundle / "generator_heun2.onnx").run(None, {"noise": noise})[0]
    with torch.no_grad():
        ref = HeunGenerator(load_model(dm_ckpt), 2)(torch.from_numpy(noise)).numpy()
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1


def test_bundle_loads_as_torch_model(cm_bundle: Path, cm_ckpt: Path) -> None:
    a, b = load_model(cm_bundle), load_model(cm_ckpt)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_parity_gate_refuses_to_write(cm_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "refused"
    with pytest.raises(ParityError, match=r"max error b1=\d.*exceeds tolerance -1; bundle not written"):
        export_bundle(cm_ckpt, out, steps=(1,), tolerance=-1)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no temporary directory left behind


def test_fp16_bundle_keeps_io_fp32(cm_ckpt: Path, tmp_path: Path) -> None:
    out = export_bundle(cm_ckpt, tmp_path / "fp16", steps=(1,), fp16=True, parity_batches=(1, 3))
    m = read_manifest(out).to_json()
    assert m["precision"] == "fp16" and m["parity"]["onnxruntime"]["1"]["passed"]
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out / "generator_1step.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    by_op: dict[str, set[int]] = {}
    for n in (n for n in model.graph.node if n.input):  # Constant nodes have no inputs
        by_op.setdefault(n.op_type, set()).add(types.get(n.input[0], 0))
    half, full = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert by_op["Conv"] == {half} and by_op["Gemm"] == {half}  # compute in fp16 ...
    assert by_op["InstanceNormalization"] == {full} and by_op["Softmax"] == {full}  # ... normalisation in fp32
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


def test_vector_model_is_rejected(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "mlp", build_model(ModelConfig(backbone=MLPConfig(dim=2))),
                           extra_config={"kind": "diffusion"})
    with pytest.raises(ExportError, match="only image \\(UNet\\) models"):
        export_bundle(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_kind_is_read_from_the_checkpoint_not_guessed() -> None:
    meta = CheckpointMeta(model={}, kind="consistency")
    assert check_kind(None, meta) == "consistency" and meta.sampler.name == "consistency"
    assert check_kind("diffusion", meta) == "diffusion"  # an explicit --kind wins
    with pytest.raises(ExportError, match="kind must be one of"):
        check_kind("gan", meta)


def test_manifest_is_json_with_relative_paths(cm_bundle: Path) -> None:
    m = json.loads((cm_bundle / MANIFEST).read_text())
    assert all(not Path(f).is_absolute() for f in m["files"])
    assert m["torch"] == {"weights": "model.safetensors", "config": "config.json"}
