"""The prepared (fast) data format that `quickstep-train data SOURCE OUT` writes, and its loader.

    OUT/images.npy   uint8 [N, C, H, W] (NCHW: the trainer's layout, so a batch is a plain row gather), a standard
                     .npy file that `np.load(..., mmap_mode="r")` maps without reading it
    OUT/labels.npy   int64 [N] (only for labelled data)
    OUT/meta.json    {"format": "quickstep-prepared", "version": 1, "layout": "NCHW", "shape", "num_classes",
                      "class_names", "mean" / "std" (per channel, in the model's [-1, 1] units), "std_all",
                      "source": {"kind", "path", "split", "resolution", "crop", "fingerprint"}, "images_sha256", ...}

Images are decoded once (folder, EDM zip/folder, tar shards, CIFAR-10 batches, npz) with a progress bar.  The
source fingerprint is a SHA-256 over the relative path, size and modification time of every file of the source:
`load_prepared` refuses a cache whose source still exists but no longer matches (the cache is stale); a cache whose
source is gone loads as it is.  `images_sha256` hashes the array's bytes (`quickstep-train data --verify OUT`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import Dataset, DataSpec, detect_source, load_dataset

FORMAT = "quickstep-prepared"
VERSION = 1
IMAGES, LABELS, META = "images.npy", "labels.npy", "meta.json"
CONVERTIBLE = ("folder", "edm", "tar", "cifar10", "npz")
CHUNK = 4096


class StaleCacheError(ValueError):
    """A prepared data set whose source changed after it was converted."""


def fingerprint(path: str | Path) -> str:
    """SHA-256 over (relative path, size, mtime_ns) of every file of `path` (a file or a directory tree)."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    rows = []
    stack = [("", str(p))]
    while stack:  # scandir: one directory read per folder and one stat per file (50k files: ~0.3-1.5 s)
        rel, d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir():
                    stack.append((f"{rel}{e.name}/", e.path))
                else:
                    st = e.stat()
                    rows.append(f"{rel}{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n")
    for r in sorted(rows):
        h.update(r.encode())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- convert
def convert(source: str | Path, out: str | Path, *, kind: str | None = None, split: str = "train",
            resolution: int | None = None, crop: str = "none", channels: int | None = None,
            overwrite: bool = False, progress: bool = True, workers: int | None = None) -> dict[str, Any]:
    """Decode `source` once into OUT (images.npy + labels.npy + meta.json, written atomically); returns the meta.
    Image files are read and decoded by `workers` DataLoader processes, in order (reading many small files is
    latency-bound); default: one per CPU core (at most 8), none for sets under 1024 images; 0 = this process."""
    t0 = time.perf_counter()
    src, out = Path(source).expanduser(), Path(out).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"data source {str(src)!r} does not exist")
    kind = kind or detect_source(src)
    if kind not in CONVERTIBLE:
        raise ValueError(f"cannot convert a {kind!r} source; convertible: {', '.join(CONVERTIBLE)}")
    if out.exists():
        if not overwrite:
            raise ValueError(f"{str(out)!r} already exists; pass --overwrite to replace it")
        if out.is_dir() and not (out / META).is_file() and any(out.iterdir()):
            raise ValueError(f"{str(out)!r} exists and is not a prepared data set; refusing to overwrite it")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ValueError(f"write the prepared set outside its source {str(src)!r}")
    options: dict[str, Any] = {} if channels is None or kind in ("cifar10", "npz") else {"channels": channels}
    if kind in ("folder", "edm", "tar"):
        from .sources import FileSource

        items: Any = FileSource(kind, src, resolution=resolution, crop=crop, **options)
        spec, labels, n = items.spec, items.labels, len(items)
    else:
        items = load_dataset(kind, path=str(src), split=split, resolution=resolution, crop=crop)
        if items.spec.kind != "image":
            raise ValueError(f"{str(src)!r} holds vectors, not images; the prepared format stores images (train on "
                             f"the .npz directly)")
        spec, n = items.spec, len(items)
        labels = None if items.y is None else items.y.numpy()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        arr = np.lib.format.open_memmap(tmp / IMAGES, mode="w+", dtype=np.uint8, shape=(n, *spec.shape))
        c = spec.shape[0]
        s1, s2 = np.zeros(c, np.float64), np.zeros(c, np.float64)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n, desc=f"converting {src.name}", unit="img", dynamic_ncols=True, mininterval=0.5)
        for lo, chunk in _chunks(items, n, workers):
            hi = lo + len(chunk)
            arr[lo:hi] = chunk
            f = chunk.astype(np.float64) / 127.5 - 1.0
            s1 += f.sum(axis=(0, 2, 3))
            s2 += np.square(f).sum(axis=(0, 2, 3))
            if bar is not None:
                bar.update(hi - lo)
        if bar is not None:
            bar.close()
        arr.flush()
        del arr
        if labels is not None:
            np.save(tmp / LABELS, np.asarray(labels, dtype=np.int64))
        per = n * spec.shape[1] * spec.shape[2]
        mean = s1 / per
        std = np.sqrt(np.maximum(s2 / per - mean**2, 0.0))
        all_mean = s1.sum() / (per * c)
        meta = {
            "format": FORMAT, "version": VERSION, "layout": "NCHW", "dtype": "uint8", "name": spec.name,
            "shape": [n, *spec.shape], "num_classes": spec.num_classes,
            "class_names": None if spec.class_names is None else list(spec.class_names),
            "mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std],
            "std_all": round(float(np.sqrt(max(s2.sum() / (per * c) - all_mean**2, 0.0))), 6),
            "source": {"kind": kind, "path": str(src.resolve()), "split": split, "resolution": resolution,
                       "crop": crop, "fingerprint": fingerprint(src)},
            "images_sha256": _sha256_file(tmp / IMAGES),
            "seconds": round(time.perf_counter() - t0, 3),
            "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _chunks(items: Any, n: int, workers: int) -> Any:
    """(start, uint8 [k, C, H, W]) chunks of an in-memory Dataset or a FileSource (decoded by DataLoader workers)."""
    if isinstance(items, Dataset):
        for lo in range(0, n, CHUNK):
            d = items.data[lo : lo + CHUNK]
            yield lo, (d if d.dtype == torch.uint8 else ((d + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)).numpy()
        return
    from .stream import _collate, _worker_init, worker_error

    if workers is None:
        workers = 0 if n < 1024 else min(os.cpu_count() or 1, 8)
    step = 256
    batches = [list(range(lo, min(lo + step, n))) for lo in range(0, n, step)]
    kw: dict[str, Any] = {"prefetch_factor": 4, "worker_init_fn": _worker_init} if workers > 0 else {}
    loader = torch.utils.data.DataLoader(items, batch_sampler=batches, num_workers=workers, collate_fn=_collate, **kw)
    try:
        for b, (x, _, _) in zip(batches, loader, strict=True):
            yield b[0], x.numpy()
    except ValueError as e:  # a worker's error: keep its message, not the re-raised traceback
        raise ValueError(worker_error(e)) from None


# ----------------------------------------------------------------------------------------------- load
def read_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        meta = json.loads((p / META).read_text())
    except FileNotFoundError as e:
        raise ValueError(f"prepared dataset {str(p)!r} has no {META}; write it with `quickstep-train data SOURCE "
                         f"{p}`") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"prepared dataset {str(p / META)!r} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{str(p / META)!r} is not a {FORMAT} v{VERSION} meta file")
    return meta


def check_source(path: str | Path, meta: dict[str, Any]) -> None:
    """Raise StaleCacheError when the cache's source still exists but its fingerprint changed."""
    src = (meta.get("source") or {}).get("path")
    if not src or not Path(src).exists():
        return
    now = fingerprint(src)
    if now != meta["source"].get("fingerprint"):
        s = meta["source"]
        again = (f"quickstep-train data {src} {path} --overwrite"
                 + (f" --resolution {s['resolution']}" if s.get("resolution") else "")
                 + (f" --crop {s['crop']}" if s.get("crop", "none") != "none" else "")
                 + (f" --split {s['split']}" if s.get("kind") in ("cifar10", "npz") else ""))
        raise StaleCacheError(f"prepared dataset {str(path)!r} is stale: its source {src!r} changed after the "
                              f"conversion (source fingerprint {now[:12]} != recorded "
                              f"{str(s.get('fingerprint'))[:12]}); rebuild it: {again}  (or train on the old copy "
                              f"with --set data.options.verify_source=false)")


def load_prepared(path: str | Path, *, resolution: int | None = None, crop: str = "none",
                  verify_source: bool = True) -> Dataset:
    """A prepared data set as an in-memory Dataset whose uint8 images are memory-mapped (pages load on use)."""
    p = Path(path)
    meta = read_meta(p)
    if verify_source:
        check_source(p, meta)
    shape = tuple(int(s) for s in meta["shape"])
    if resolution is not None and shape[2:] != (resolution, resolution):
        raise ValueError(f"prepared dataset {str(p)!r} holds {shape[3]}x{shape[2]} images, data.resolution is "
                         f"{resolution}; convert again with --resolution {resolution} or set data.resolution=none")
    if crop != "none" and shape[2] != shape[3]:
        raise ValueError(f"prepared dataset {str(p)!r} holds {shape[3]}x{shape[2]} images; crop at conversion "
                         f"(--crop center)")
    try:
        arr = np.load(p / IMAGES, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"prepared dataset: cannot map {str(p / IMAGES)!r} ({e}); convert it again") from e
    if arr.dtype != np.uint8 or tuple(arr.shape) != shape:
        raise ValueError(f"prepared dataset: {str(p / IMAGES)!r} is {arr.dtype} {list(arr.shape)}, {META} says uint8 "
                         f"{list(shape)}; convert it again")
    y = None
    if (p / LABELS).is_file():
        yl = np.load(p / LABELS, allow_pickle=False)
        if yl.shape != (shape[0],):
            raise ValueError(f"prepared dataset: {str(p / LABELS)!r} has shape {list(yl.shape)}, expected "
                             f"[{shape[0]}]")
        y = torch.from_numpy(yl.astype(np.int64))
    names = meta.get("class_names")
    spec = DataSpec("image", shape[1:], int(meta.get("num_classes", 0)), str(meta.get("name") or p.name),
                    None if names is None else tuple(names))
    return Dataset(torch.from_numpy(arr), y, spec)


def verify(path: str | Path) -> None:
    """Check a prepared set's bytes against its recorded images_sha256 (and its source fingerprint)."""
    p = Path(path)
    meta = read_meta(p)
    got = _sha256_file(p / IMAGES)
    if got != meta.get("images_sha256"):
        raise ValueError(f"prepared dataset {str(p / IMAGES)!r} is corrupt: sha256 {got[:12]} != recorded "
                         f"{str(meta.get('images_sha256'))[:12]}; convert it again")
    check_source(p, meta)


__all__ = ["CONVERTIBLE", "FORMAT", "StaleCacheError", "convert", "fingerprint", "load_prepared", "read_meta",
           "verify"]
