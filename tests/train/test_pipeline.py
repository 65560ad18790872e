"""The streaming data pipeline (issue 23): EDM zips and folders, tar shards, the prepared format and
`quickstep-train data`, the distributed infinite sampler, x-flip, streamed == in-memory batches, exact resume of a
streamed run, class names into the checkpoint, and the clear errors."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from quickstep.train.config import ConfigError, build_config
from quickstep.train.core import checkpoint as ckpt
from quickstep.train.data import Dataset, detect_source, load_dataset
from quickstep.train.loop import Trainer, config_from_checkpoint
from quickstep.train.prepare import StaleCacheError, convert, load_prepared, verify
from quickstep.train.sources import FileSource
from quickstep.train.stream import DataFeed, InfiniteSampler

pytestmark = pytest.mark.usefixtures("one_thread")


def _png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _images(n: int, size=(8, 8), seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def make_edm_zip(path: Path, n: int = 12, classes: int = 3, *, names: list[str] | None = None, size=(8, 8)) -> list:
    """An EDM dataset_tool-style zip: 00000/img%08d.png + dataset.json {"labels": [[name, label], ...]}."""
    imgs = _images(n, size)
    labels = [[f"00000/img{i:08d}.png", i % classes] for i in range(n)]
    with zipfile.ZipFile(path, "w") as z:
        for i, im in enumerate(imgs):
            z.writestr(f"00000/img{i:08d}.png", _png_bytes(im))
        meta: dict = {"labels": labels}
        if names is not None:
            meta["class_names"] = names
        z.writestr("dataset.json", json.dumps(meta))
    return imgs


def make_folder(root: Path, per_class: int = 4, classes=("cat", "dog", "emu"), size=(8, 8)) -> None:
    from PIL import Image

    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for j, im in enumerate(_images(per_class, size, seed=c)):
            Image.fromarray(im).save(root / cls / f"{j}.png")


def make_tar_shards(root: Path, n: int = 10, per_shard: int = 4, *, labels: bool = True) -> list[np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    imgs = _images(n)
    for s in range(0, n, per_shard):
        with tarfile.open(root / f"shard-{s // per_shard:04d}.tar", "w") as tf:
            for i in range(s, min(s + per_shard, n)):
                for name, data in ((f"{i:06d}.png", _png_bytes(imgs[i])), (f"{i:06d}.cls", str(i % 2).encode())):
                    if name.endswith(".cls") and not labels:
                        continue
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    (root / "dataset.json").write_text(json.dumps({"class_names": ["even", "odd"]}))
    return imgs


# ----------------------------------------------------------------------------------------------- sources
def test_edm_zip_labels_class_names_and_streaming(tmp_path):
    imgs = make_edm_zip(tmp_path / "set.zip", names=["a", "b", "c"])
    ds = load_dataset("edm", path=str(tmp_path / "set.zip"))
    assert isinstance(ds, Dataset) and ds.data.dtype == torch.uint8 and ds.data.shape == (12, 3, 8, 8)
    assert ds.spec.class_names == ("a", "b", "c") and ds.y.tolist() == [i % 3 for i in range(12)]
    assert torch.equal(ds.data[5], torch.from_numpy(imgs[5]).permute(2, 0, 1))
    torch.testing.assert_close(ds.x, ds.data.float() / 127.5 - 1)
    src = load_dataset("edm", path=str(tmp_path / "set.zip"), stream=True)
    assert isinstance(src, FileSource) and len(src) == 12
    x, y = src[5]
    assert torch.equal(x, ds.data[5]) and y == 2
    xf, _ = src[12 + 5]  # x-flip index: image 5 mirrored
    assert torch.equal(xf, ds.data[5].flip(-1))
    assert detect_source(tmp_path / "set.zip") == "edm"


def test_edm_folder_and_resolution_crop(tmp_path):
    root = tmp_path / "edm"
    (root / "00000").mkdir(parents=True)
    from PIL import Image

    for i, im in enumerate(_images(4, size=(6, 10))):  # 10 wide, 6 high
        Image.fromarray(im).save(root / "00000" / f"img{i:08d}.png")
    (root / "dataset.json").write_text(json.dumps({"labels": None}))
    assert detect_source(root) == "edm"
    ds = load_dataset("edm", path=str(root))
    assert ds.data.shape == (4, 3, 6, 10) and ds.y is None and ds.spec.num_classes == 0
    sq = load_dataset("edm", path=str(root), resolution=4, crop="center")
    assert sq.data.shape == (4, 3, 4, 4) and sq.data.dtype == torch.uint8


def test_tar_shards_random_access(tmp_path):
    imgs = make_tar_shards(tmp_path / "shards")
    ds = load_dataset("tar", path=str(tmp_path / "shards"))
    assert len(ds) == 10 and ds.spec.class_names == ("even", "odd") and ds.y.tolist() == [i % 2 for i in range(10)]
    for i in (0, 3, 4, 9):
        assert torch.equal(ds.data[i], torch.from_numpy(imgs[i]).permute(2, 0, 1))
    src = load_dataset("tar", path=str(tmp_path / "shards"), stream=True)
    assert torch.equal(src[7][0], ds.data[7])
    assert detect_source(tmp_path / "shards") == "tar"
    meta = convert(tmp_path / "shards", tmp_path / "prep", progress=False)
    assert meta["source"]["kind"] == "tar" and meta["class_names"] == ["even", "odd"]
    assert torch.equal(load_prepared(tmp_path / "prep").data, ds.data)


# ----------------------------------------------------------------------------------------------- errors
def test_errors_name_the_problem(tmp_path):
    # an empty class
    make_folder(tmp_path / "f")
    (tmp_path / "f" / "zebra").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) \['zebra'\] hold no images"):
        load_dataset("folder", path=str(tmp_path / "f"))
    # a label file that names missing images
    z = tmp_path / "missing.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a.png", _png_bytes(_images(1)[0]))
        zf.writestr("dataset.json", json.dumps({"labels": [["a.png", 0], ["gone.png", 1]]}))
    with pytest.raises(ValueError, match=r"dataset.json labels 1 image\(s\) that do not exist: \['gone.png'\]"):
        load_dataset("edm", path=str(z))
    # an image without a label
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a.png", _png_bytes(_images(1)[0]))
        zf.writestr("b.png", _png_bytes(_images(1)[0]))
        zf.writestr("dataset.json", json.dumps({"labels": [["a.png", 0]]}))
    with pytest.raises(ValueError, match=r"no label for 1 image\(s\), e.g. 'b.png'"):
        load_dataset("edm", path=str(z))
    # an unreadable file, named (decoded at conversion; when streamed, by the loader's worker)
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a.png", _png_bytes(_images(1)[0]))
        zf.writestr("b.png", b"this is not a png")
    with pytest.raises(ValueError, match=r"cannot read image 'missing.zip:b.png'"):
        load_dataset("edm", path=str(z))
    for workers in (0, 2):
        with pytest.raises(ValueError, match=r"^cannot read image 'missing.zip:b.png'"):
            convert(z, tmp_path / "out", progress=False, workers=workers)
    feed = DataFeed(load_dataset("edm", path=str(z), stream=True), InfiniteSampler(2, 0), device=torch.device("cpu"),
                    batch_size=2, workers=1)
    with pytest.raises(ValueError, match=r"^data loading failed: cannot read image 'missing.zip:b.png'"):
        feed.next()
    feed.close()
    # mixed sizes without a resolution
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a.png", _png_bytes(_images(1, (8, 8))[0]))
        zf.writestr("b.png", _png_bytes(_images(1, (8, 9))[0]))
    with pytest.raises(ValueError, match=r"'missing.zip:b.png' is 9x8, the first image .* is 8x8; set data.resolution"):
        convert(z, tmp_path / "out", progress=False)
    assert convert(z, tmp_path / "out", resolution=8, progress=False)["shape"] == [2, 3, 8, 8]
    # compressed shards
    with tarfile.open(tmp_path / "gz.tar", "w:gz") as tf:
        info = tarfile.TarInfo("0.png")
        data = _png_bytes(_images(1)[0])
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="not an uncompressed tar"):
        load_dataset("tar", path=str(tmp_path / "gz.tar"))
    # x-flip on the mixtures
    with pytest.raises(ConfigError, match="data.xflip mirrors images"):
        build_config({"data": {"name": "gmm", "xflip": True}, "objectives": {"diffusion": {}}})


# ----------------------------------------------------------------------------------------------- prepared
def test_prepare_roundtrip_stale_cache_and_verify(tmp_path):
    make_folder(tmp_path / "imgs")
    meta = convert(tmp_path / "imgs", tmp_path / "prep", progress=False)
    assert meta["shape"] == [12, 3, 8, 8] and meta["class_names"] == ["cat", "dog", "emu"]
    assert meta["layout"] == "NCHW" and len(meta["mean"]) == 3 and len(meta["std"]) == 3
    assert detect_source(tmp_path / "prep") == "prepared"
    ref = load_dataset("folder", path=str(tmp_path / "imgs"))
    got = load_dataset("prepared", path=str(tmp_path / "prep"))
    assert torch.equal(got.data, ref.data) and torch.equal(got.y, ref.y) and got.spec == ref.spec
    assert isinstance(np.load(tmp_path / "prep" / "images.npy", mmap_mode="r"), np.memmap)
    x = ref.x.double()
    np.testing.assert_allclose(meta["mean"], x.mean(dim=(0, 2, 3)).numpy(), atol=1e-5)
    np.testing.assert_allclose(meta["std"], x.std(dim=(0, 2, 3), correction=0).numpy(), atol=1e-5)
    verify(tmp_path / "prep")
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        convert(tmp_path / "imgs", tmp_path / "prep", progress=False)
    # the source changes: the cache is stale
    make_folder(tmp_path / "imgs", per_class=5)
    with pytest.raises(StaleCacheError, match=r"is stale: its source .*imgs' changed after the conversion"):
        load_prepared(tmp_path / "prep")
    assert len(load_prepared(tmp_path / "prep", verify_source=False)) == 12
    convert(tmp_path / "imgs", tmp_path / "prep", overwrite=True, progress=False)
    assert len(load_prepared(tmp_path / "prep")) == 15
    # corrupt bytes
    with open(tmp_path / "prep" / "images.npy", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01" if f.read(1) != b"\x01" else b"\x02")
    with pytest.raises(ValueError, match="is corrupt: sha256"):
        verify(tmp_path / "prep")
    with pytest.raises(ValueError, match="holds 8x8 images, data.resolution is 16"):
        load_prepared(tmp_path / "prep", resolution=16)


def test_cli_data_command(tmp_path, capsys):
    from quickstep.train.cli import main

    make_edm_zip(tmp_path / "set.zip")
    assert main(["data", str(tmp_path / "set.zip"), str(tmp_path / "prep"), "--quiet"]) == 0
    assert "wrote 12 images 3x8x8" in capsys.readouterr().out
    assert main(["data", "--verify", str(tmp_path / "prep")]) == 0
    assert main(["data", str(tmp_path / "nowhere"), str(tmp_path / "p2")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- sampler
def test_sampler_ranks_split_each_global_batch_and_xflip_doubles_the_epoch():
    s = InfiniteSampler(10, seed=3)
    glob = s.indices(0, 40)
    for e in range(4):
        assert sorted(glob[10 * e : 10 * (e + 1)].tolist()) == list(range(10))  # every sample once per epoch
    s.position = 6
    r0, r1 = s.rank_batches(4, 0, 2), s.rank_batches(4, 1, 2)
    for k in range(5):
        a, b = next(r0), next(r1)
        assert a + b == glob[6 + 4 * k : 10 + 4 * k].tolist()  # the ranks' parts make up the global batch
    f = InfiniteSampler(10, seed=3, xflip=True)
    assert sorted(f.indices(0, 20).tolist()) == list(range(20))
    f.next(7)
    st = f.state_dict()
    g = InfiniteSampler(10, seed=3, xflip=True)
    g.load_state_dict(st)
    assert torch.equal(g.next(9), f.next(9))
    with pytest.raises(ValueError, match="resume with the data set the run started with"):
        InfiniteSampler(11, seed=3, xflip=True).load_state_dict(st)


# ----------------------------------------------------------------------------------------------- trainer
def image_config(data: dict, steps: int = 6, **over) -> object:
    d = {"steps": steps, "batch_size": 8, "seed": 0, "device": "cpu",
         "data": {"workers": 2, "prefetch": 2, **data},
         "model": {"kind": "unet", "logvar_channels": 8, "conditional": True,
                   "backbone": {"model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": [],
                                "time_scale": 10.0}},
         "optim": {"lr": 1e-3}, "ema": {"halflife_kimg": 0.5},
         "log": {"every": 1, "ckpt_every": 3, "keep_checkpoints": 0, "tensorboard": False, "progress": False,
                 "samples": False},
         "objectives": {"stf": {"ref_batch": 12, "label_dropout": 0.1}}, **over}
    return build_config(d)


def test_streamed_equals_in_memory_and_resumes_bit_for_bit(tmp_path):
    """The same x-flipped order from the EDM zip through DataLoader workers and from its prepared (memory-mapped)
    copy: identical losses.  A streamed run resumed from its step-3 checkpoint (24 indices per x-flipped epoch, so
    the resumed run's batch 4 starts epoch 1, the DataLoader having prefetched beyond it) equals the uninterrupted
    one, losses and weights bit for bit."""
    make_edm_zip(tmp_path / "set.zip", names=["a", "b", "c"])
    convert(tmp_path / "set.zip", tmp_path / "prep", progress=False)
    streamed = image_config({"name": "edm", "path": str(tmp_path / "set.zip"), "xflip": True}, steps=7)
    memory = image_config({"name": "prepared", "path": str(tmp_path / "prep"), "xflip": True}, steps=7)
    a = Trainer(streamed, tmp_path / "a")
    assert a.feed.streamed and a.feed.workers == 2
    full = a.fit()
    a.close()
    m = Trainer(memory, tmp_path / "m")
    assert not m.feed.streamed and m.feed.data.dtype == torch.uint8
    assert m.fit().losses == full.losses
    m.close()
    mid = tmp_path / "a" / "step-0000003"
    assert ckpt.load_state(mid)["sampler"] == {"epoch": 1, "pos": 0, "size": 24}
    b = Trainer(config_from_checkpoint(mid), tmp_path / "b", resume=mid)
    rest = b.fit()
    b.close()
    assert rest.losses == full.losses[3:]
    for pa, pb in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    meta = ckpt.load_config(tmp_path / "a" / "step-0000007")
    assert meta["data"]["class_names"] == ["a", "b", "c"]
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert all(r["data_img_per_s"] > 0 and 0 <= r["data_wait_frac"] for r in log)


def test_xflip_mirrors_exactly_the_second_half_of_the_indices(tmp_path):
    make_folder(tmp_path / "imgs", per_class=2)
    convert(tmp_path / "imgs", tmp_path / "prep", progress=False)
    cfg = image_config({"name": "prepared", "path": str(tmp_path / "prep"), "xflip": True}, steps=1,
                       batch_size=12)
    tr = Trainer(cfg, tmp_path / "run")
    gx, gy, _, _ = tr.feed.next()
    idx = tr.sampler.indices(0, 12)
    ds = load_dataset("prepared", path=str(tmp_path / "prep"))
    for row, i in zip(gx, idx.tolist(), strict=True):
        want = ds.x[i % 6]
        assert torch.equal(row, want.flip(-1) if i >= 6 else want)
    assert gy.tolist() == [int(ds.y[i % 6]) for i in idx.tolist()]
    tr.close()


def test_eval_reference_sets_are_never_augmented(tmp_path):
    """eval loads the data a checkpoint was trained on with its resolution and crop but without x-flip."""
    from quickstep.train.eval.pipeline import load_split

    from quickstep.artifacts import CheckpointMeta

    make_folder(tmp_path / "imgs", size=(8, 10))
    cfg = image_config({"name": "folder", "path": str(tmp_path / "imgs"), "xflip": True, "crop": "center",
                        "resolution": 8})
    ref = load_split(CheckpointMeta(model={}, kind="diffusion", train=cfg.to_dict()), "train")
    plain = load_dataset("folder", path=str(tmp_path / "imgs"), resolution=8, crop="center")
    assert torch.equal(ref.data, plain.data) and ref.data.shape == (12, 3, 8, 8)
