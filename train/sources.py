"""Image files as a data source: a folder of class sub-folders, EDM's format (a zip or a folder of images with an
optional dataset.json `{"labels": [[filename, label], ...]}`, as EDM's dataset_tool.py writes it) and
WebDataset-style tar shards (`KEY.png` + optional `KEY.cls` members in uncompressed .tar files).

A `FileSource` indexes the files once (names, labels, tar offsets: no image is decoded except the first, which fixes
the shape) and decodes one image per `__getitem__`, so it serves as the map-style dataset of a
`torch.utils.data.DataLoader` whose workers decode in parallel (`quickstep.train.stream`).  Index i in [N, 2N) is
image i - N mirrored left-right (EDM's x-flip as extra indices: the sampler decides, so the order resumes exactly).
`materialize()` decodes everything into an in-memory uint8 `Dataset` (small sets, eval's reference sets).

Files are read in sorted order; zip and tar handles are opened lazily once per process (DataLoader workers fork).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import IMAGE_EXTENSIONS, Dataset, DataSpec

CROPS = ("none", "center")
LABELS_FILE = "dataset.json"  # EDM: {"labels": [[name, label], ...] | null}; Quickstep adds "class_names": [...]


# ----------------------------------------------------------------------------------------------- decoding
def decode_image(src: bytes | str | Path, where: str, *, channels: int | None, resolution: int | None,
                 crop: str = "none") -> np.ndarray:
    """One encoded image -> uint8 [C, H, W]: converted to `channels` (1 = grayscale, 3 = RGB, None = 1 for
    grayscale files else 3), center-cropped to a square (crop='center'), resized to resolution x resolution
    (bilinear).  Raises ValueError naming `where` when the file cannot be decoded."""
    from PIL import Image

    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            if channels is None:
                channels = 1 if im.mode in ("1", "L", "I", "I;16", "F") else 3
            im = im.convert("L" if channels == 1 else "RGB")
            if crop == "center" and im.size[0] != im.size[1]:
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            if resolution is not None and im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {where!r} ({type(e).__name__}: {e})") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


# ----------------------------------------------------------------------------------------------- indexes
def _hidden(rel: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


def _walk(root: Path) -> list[str]:
    """Relative '/'-separated names of every image below `root` (hidden files and folders skipped), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        for f in filenames:
            if not f.startswith(".") and _is_image(f):
                out.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
    return sorted(out)


def index_folder(path: Path) -> tuple[list[str], np.ndarray | None, tuple[str, ...] | None]:
    """A folder of images, or of class sub-folders (sorted folder names are the class names, their index the
    label): (relative file names, labels or None, class names or None)."""
    if not path.is_dir():
        raise ValueError(f"folder dataset: {str(path)!r} is not a directory of images")
    subdirs = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    top = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and _is_image(p.name))
    if not subdirs:
        if not top:
            raise ValueError(f"folder dataset {str(path)!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in it "
                             f"or its sub-folders")
        return top, None, None
    per_class = {c: sorted(f"{c}/{f}" for f in _walk(path / c)) for c in subdirs}
    if top:
        raise ValueError(f"folder dataset {str(path)!r}: holds both images ({top[0]!r}, ...) and class sub-folders "
                         f"{subdirs}; put every image into a class sub-folder or none")
    empty = [c for c, files in per_class.items() if not files]
    if empty:
        raise ValueError(f"folder dataset {str(path)!r}: class folder(s) {empty} hold no images "
                         f"({', '.join(IMAGE_EXTENSIONS)}); every sub-folder is a class - add images or remove them")
    files = [f for c in subdirs for f in per_class[c]]
    labels = np.concatenate([np.full(len(per_class[c]), i, dtype=np.int64) for i, c in enumerate(subdirs)])
    return files, labels, tuple(subdirs)


def read_labels_json(text: str | bytes, where: str, names: list[str]) -> tuple[np.ndarray | None,
                                                                               tuple[str, ...] | None]:
    """EDM's dataset.json for the images `names`: (labels aligned with names or None, class names or None).
    Every image needs a label and every labelled file must exist."""
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{where} must hold an object {{\"labels\": [[filename, label], ...]}}")
    raw_names = meta.get("class_names")
    class_names = None
    if raw_names is not None:
        if not isinstance(raw_names, list) or not all(isinstance(n, str) for n in raw_names):
            raise ValueError(f"{where}: class_names must be a list of strings")
        class_names = tuple(raw_names)
    raw = meta.get("labels")
    if raw is None:
        return None, class_names
    if not isinstance(raw, list) or not all(isinstance(p, list) and len(p) == 2 for p in raw):
        raise ValueError(f"{where}: labels must be a list of [filename, label] pairs (EDM's dataset_tool format)")
    table: dict[str, int] = {}
    for fname, label in raw:
        if not isinstance(fname, str) or isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise ValueError(f"{where}: each label must be [filename, integer >= 0]; got {[fname, label]!r} (one-hot "
                             f"or vector labels are not supported)")
        table[fname.replace("\\", "/")] = label
    have = set(names)
    missing = sorted(f for f in table if f not in have)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{where} labels {len(missing)} image(s) that do not exist: {missing[:5]}{more}")
    unlabelled = [f for f in names if f not in table]
    if unlabelled:
        raise ValueError(f"{where} has no label for {len(unlabelled)} image(s), e.g. {unlabelled[0]!r}; label every "
                         f"image or set \"labels\": null")
    labels = np.array([table[f] for f in names], dtype=np.int64)
    if class_names is not None and int(labels.max()) >= len(class_names):
        raise ValueError(f"{where}: label {int(labels.max())} but only {len(class_names)} class_names")
    return labels, class_names


def _tar_shards(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    shards = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(".tar"))
    if not shards:
        raise ValueError(f"tar dataset: {str(path)!r} holds no .tar shards (compressed .tar.gz shards are not "
                         f"supported: they cannot be read at random positions)")
    return shards


def index_tar(path: Path) -> tuple[list[Path], list[tuple[int, int, int, str]], np.ndarray | None,
                                   tuple[str, ...] | None]:
    """WebDataset-style shards: members `KEY.EXT` grouped by KEY (the name up to the first dot of its last path
    component); one image member per key and an optional `KEY.cls` (an integer label as text).  Returns the shards,
    one (shard, data offset, size, member name) per sample, labels or None, class names (from a dataset.json
    {"class_names": [...]} next to the shards) or None."""
    shards = _tar_shards(path)
    entries: list[tuple[int, int, int, str]] = []
    labels: list[int | None] = []
    for si, shard in enumerate(shards):
        try:
            tf = tarfile.open(shard, "r:")
        except tarfile.ReadError as e:
            raise ValueError(f"tar dataset: {str(shard)!r} is not an uncompressed tar file ({e}); WebDataset shards "
                             f"must be plain .tar") from e
        with tf:
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            for m in tf:
                if not m.isfile():
                    continue
                head, _, base = m.name.rpartition("/")
                key, _, ext = base.partition(".")
                samples.setdefault(f"{head}/{key}", {})[ext.lower()] = m
            for key in sorted(samples):
                parts = samples[key]
                imgs = [e for e in parts if f".{e}" in IMAGE_EXTENSIONS]
                if not imgs:
                    continue
                if len(imgs) > 1:
                    raise ValueError(f"tar dataset: sample {key.lstrip('/')!r} in {shard.name} has several images "
                                     f"{sorted(imgs)}; keep one image per key")
                m = parts[imgs[0]]
                entries.append((si, m.offset_data, m.size, f"{shard.name}:{m.name}"))
                if "cls" in parts:
                    text = tf.extractfile(parts["cls"]).read().decode(errors="replace").strip()  # type: ignore[union-attr]
                    if not text.isdigit():
                        raise ValueError(f"tar dataset: {shard.name}:{parts['cls'].name} must hold an integer label "
                                         f">= 0, got {text[:40]!r}")
                    labels.append(int(text))
                else:
                    labels.append(None)
    if not entries:
        raise ValueError(f"tar dataset {str(path)!r}: no image members ({', '.join(IMAGE_EXTENSIONS)}) in "
                         f"{len(shards)} shard(s)")
    have = [v is not None for v in labels]
    if any(have) and not all(have):
        first = entries[have.index(False)][3]
        raise ValueError(f"tar dataset {str(path)!r}: {have.count(False)} sample(s) have no .cls label (e.g. "
                         f"{first!r}) while others do; label every sample or none")
    class_names = None
    meta = (path if path.is_dir() else path.parent) / LABELS_FILE
    if meta.is_file():
        _, class_names = read_labels_json(meta.read_text(), str(meta), [])
    y = np.array(labels, dtype=np.int64) if all(have) else None
    return shards, entries, y, class_names


# ----------------------------------------------------------------------------------------------- the source
class FileSource(torch.utils.data.Dataset):
    """Encoded images read one at a time: kind 'folder', 'edm' (zip or folder + dataset.json) or 'tar'.

    `source[i]` -> (uint8 [C, H, W] tensor, label or -1); i in [N, 2N) is image i - N mirrored (x-flip)."""

    def __init__(self, kind: str, path: str | Path, *, resolution: int | None = None, crop: str = "none",
                 channels: int | None = None, num_classes: int | None = None):
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if crop not in CROPS:
            raise ValueError(f"data.crop must be one of {', '.join(CROPS)}, got {crop!r}")
        self.kind, self.path = kind, Path(path)
        self.resolution, self.crop = resolution, crop
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()
        self.shards: list[Path] = []
        self.entries: list[Any]
        if kind == "folder":
            self.entries, labels, names = index_folder(self.path)
        elif kind == "edm":
            self.entries, labels, names = self._index_edm()
        elif kind == "tar":
            self.shards, self.entries, labels, names = index_tar(self.path)
        else:
            raise ValueError(f"unknown file source kind {kind!r}; valid: folder, edm, tar")
        self.labels = labels
        first = decode_image(self._bytes(0), self.where(0), channels=channels, resolution=resolution, crop=crop)
        self.channels = int(first.shape[0])
        self.shape = tuple(int(s) for s in first.shape)
        nc = 0
        if labels is not None:
            nc = int(num_classes) if num_classes is not None else max(int(labels.max()) + 1, len(names or ()))
            if int(labels.max()) >= nc:
                raise ValueError(f"{kind} dataset {str(self.path)!r}: label {int(labels.max())} out of range for "
                                 f"num_classes={nc}")
        if names is not None and len(names) != nc:
            raise ValueError(f"{kind} dataset {str(self.path)!r}: {len(names)} class names for {nc} classes")
        name = self.path.stem if self.path.is_file() else self.path.name
        self.spec = DataSpec("image", self.shape, nc, name, names)

    # -- index ---------------------------------------------------------------------------------
    def _index_edm(self) -> tuple[list[str], np.ndarray | None, tuple[str, ...] | None]:
        p = self.path
        if p.is_dir():
            names = [n for n in _walk(p)]
            meta = p / LABELS_FILE
            text = meta.read_bytes() if meta.is_file() else None
        elif zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                names = sorted(n for n in z.namelist() if _is_image(n) and not n.endswith("/") and not _hidden(n))
                text = z.read(LABELS_FILE) if LABELS_FILE in z.namelist() else None
        else:
            raise ValueError(f"edm dataset: {str(p)!r} is neither a zip file nor a directory of images")
        if not names:
            raise ValueError(f"edm dataset {str(p)!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it")
        if text is None:
            return names, None, None
        labels, class_names = read_labels_json(text, f"{p.name}/{LABELS_FILE}", names)
        return names, labels, class_names

    # -- reading -------------------------------------------------------------------------------
    def _handle(self, key: str, opener: Callable[[], Any]) -> Any:
        if self._pid != os.getpid():  # a forked DataLoader worker: never share the parent's file offsets
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(key)
        if h is None:
            h = self._handles[key] = opener()
        return h

    def where(self, i: int) -> str:
        e = self.entries[i]
        return e[3] if self.kind == "tar" else str(self.path / e) if self.path.is_dir() else f"{self.path.name}:{e}"

    def _bytes(self, i: int) -> bytes | Path:
        e = self.entries[i]
        if self.kind == "tar":
            si, offset, size, _ = e
            f = self._handle(str(si), lambda: open(self.shards[si], "rb"))  # noqa: SIM115
            f.seek(offset)
            return f.read(size)
        if self.path.is_dir():
            return self.path / e
        z = self._handle("zip", lambda: zipfile.ZipFile(self.path))
        try:
            return z.read(e)
        except (zipfile.BadZipFile, OSError, KeyError) as err:
            raise ValueError(f"cannot read image {self.where(i)!r} ({err})") from err

    def read(self, i: int) -> np.ndarray:
        """Image i (0 <= i < N) decoded: uint8 [C, H, W] of the source's shape."""
        arr = decode_image(self._bytes(i), self.where(i), channels=self.channels, resolution=self.resolution,
                           crop=self.crop)
        if arr.shape != self.shape:
            raise ValueError(f"{self.kind} dataset: {self.where(i)!r} is {arr.shape[2]}x{arr.shape[1]}, the first "
                             f"image ({self.where(0)!r}) is {self.shape[2]}x{self.shape[1]}; set data.resolution "
                             f"(--resolution) to resize them all (and data.crop='center' to keep the aspect ratio)")
        return arr

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self.entries)
        arr = self.read(i % n)
        if i >= n:
            arr = arr[:, :, ::-1]
        label = int(self.labels[i % n]) if self.labels is not None else -1
        return torch.from_numpy(np.ascontiguousarray(arr)), label

    def head(self, n: int) -> FileSource:
        """A copy that keeps the first n images."""
        if n < 1:
            raise ValueError(f"limit must be >= 1, got {n}")
        import copy

        out = copy.copy(self)
        out.entries = self.entries[:n]
        out.labels = None if self.labels is None else self.labels[:n]
        out._handles = {}
        return out

    def materialize(self, progress: bool = False) -> Dataset:
        """Every image decoded into an in-memory uint8 Dataset."""
        out = np.empty((len(self), *self.shape), dtype=np.uint8)
        for i in _progress(range(len(self)), progress, f"decoding {self.path.name}"):
            out[i] = self.read(i)
        y = torch.from_numpy(self.labels) if self.labels is not None else None
        return Dataset(torch.from_numpy(out), y, self.spec)

    def __getstate__(self) -> dict[str, Any]:  # spawn-started workers: no open handles travel
        d = dict(self.__dict__)
        d["_handles"] = {}
        return d


def _progress(it: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="img", dynamic_ncols=True, mininterval=0.5)


__all__ = ["CROPS", "FileSource", "decode_image", "index_folder", "index_tar", "read_labels_json"]
