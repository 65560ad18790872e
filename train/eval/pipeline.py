"""The one evaluation pipeline: images from a generator callable -> sample-quality metrics, markdown and plots.

Both `quickstep-train eval` (a checkpoint sampled in torch) and `quickstep-export report` (a bundle sampled
through the backends that serve it) are adapters around the same pieces:

- `ImagesFn`: `images(noises, labels) -> images`, either float [B, C, H, W] in [-1, 1] (torch) or uint8
  [B, H, W, C] (a served graph); `sample` runs one over batches of inputs and times it;
- `evaluator_for`: the data set a checkpoint was trained on (its `CheckpointMeta`), the split to compare
  against and the feature network (the shipped digits classifier, or Inception-v3 from a local file);
  `Evaluator.quality` computes FD, KID, precision/recall and class accuracy;
- `hardware`, `fmt`, `markdown_table`, and the matplotlib helpers `plot_quality_vs_nfe`,
  `plot_quality_vs_latency`, `plot_per_sigma`, `plot_samples`.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quickstep.artifacts import CheckpointMeta

Images = torch.Tensor | np.ndarray
ImagesFn = Callable[[list[Any], Any], Images]  # images(noises, labels) -> float [B,C,H,W] or uint8 [B,H,W,C]


class EvalDataError(ValueError):
    """The data set or the feature network a quality measurement needs is not available."""


# ----------------------------------------------------------------------------------------------- images
def uint8_to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 torch [N, C, H, W] in [-1, 1] (the inverse of to_uint8_nhwc's grid)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def as_float_images(images: Images) -> torch.Tensor:
    """Generator output as float [N, C, H, W] in [-1, 1]: uint8 NHWC images are mapped back, floats clamped."""
    if isinstance(images, np.ndarray):
        return uint8_to_float(images) if images.dtype == np.uint8 else torch.from_numpy(images).clamp(-1, 1)
    return uint8_to_float(images.numpy()) if images.dtype == torch.uint8 else images.clamp(-1, 1)


def sample(images: ImagesFn, chunks: Iterable[tuple[list[Any], Any]]) -> tuple[Images, float]:
    """Run `images` over (noises, labels) chunks; the outputs concatenated (on the CPU) and the seconds spent
    inside the generator."""
    outs: list[Any] = []
    seconds = 0.0
    for noises, labels in chunks:
        t0 = time.perf_counter()
        out = images(noises, labels)
        seconds += time.perf_counter() - t0
        outs.append(out.cpu() if isinstance(out, torch.Tensor) else out)
    return (torch.cat(outs) if isinstance(outs[0], torch.Tensor) else np.concatenate(outs)), seconds


def chunks(noises: list[Any], labels: Any, batch: int) -> Iterable[tuple[list[Any], Any]]:
    """Slices of `batch` rows of pre-drawn inputs."""
    n = noises[0].shape[0]
    for i in range(0, n, batch):
        yield [x[i : i + batch] for x in noises], None if labels is None else labels[i : i + batch]


# ----------------------------------------------------------------------------------------------- quality
@dataclass
class Evaluator:
    """Reference features of one split of a data set and the feature/classifier functions for its images."""

    data: str  # e.g. "digits test split (300 images)"
    reference_size: int
    feature_net: str
    features: Callable[[torch.Tensor], torch.Tensor]
    ref_features: torch.Tensor
    classify: Callable[[torch.Tensor], torch.Tensor] | None = None
    kid_normalize: bool = True  # the digits classifier's features are not of order one like Inception's

    def quality(self, images: Images, labels: Any, *, generator: torch.Generator | None = None) -> dict[str, float]:
        """FD, KID (mean, std), precision/recall (k=3) and, with labels, class accuracy of generated images."""
        from .metrics import frechet_distance, kid, precision_recall

        x = as_float_images(images)
        f = self.features(x)
        k_mean, k_std = kid(f, self.ref_features, subsets=20, subset_size=min(500, len(f), len(self.ref_features)),
                            generator=generator, normalize=self.kid_normalize)
        prec, rec = precision_recall(self.ref_features, f, k=3)
        q = {"fd": frechet_distance(f, self.ref_features), "kid": k_mean, "kid_std": k_std,
             "precision": prec, "recall": rec}
        if self.classify is not None and labels is not None:
            y = torch.as_tensor(labels)
            q["class_accuracy"] = float((self.classify(x) == y.to(torch.int64).cpu()).float().mean())
        return q


def dataset_args(meta: CheckpointMeta) -> dict[str, Any]:
    """The loader arguments of the data a checkpoint was trained on: its training config's data section, else
    (a checkpoint written without one) its data spec by name."""
    from ..data import DATASETS

    d = meta.train_data
    if d is not None and d.name in DATASETS:
        return {"name": d.name, "path": d.path, "resolution": d.resolution, "crop": d.crop,
                "options": dict(d.options), "seed": d.seed}
    spec = meta.data
    if spec is not None and spec.name in DATASETS:
        return {"name": spec.name, "path": None, "resolution": int(spec.shape[-1]) if len(spec.shape) == 3 else None,
                "crop": "none", "options": {}, "seed": 0}
    named = spec.name if spec is not None else None
    raise EvalDataError(f"the checkpoint's config.json names no known data set (train.data / data: {named!r}); "
                        f"evaluation needs one of {list(DATASETS)} to compare against")


def load_split(meta: CheckpointMeta, split: str):
    """The `split` ('train' | 'test') of the checkpoint's data set."""
    from ..data import load_dataset

    d = dataset_args(meta)
    try:
        # the data as trained on (same resolution and crop), never augmented: x-flip lives in the trainer only
        return load_dataset(d["name"], path=d["path"], split=split, seed=d["seed"], resolution=d["resolution"],
                            crop=d["crop"], **d["options"])
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise EvalDataError(f"cannot load the {split} split of data set {d['name']!r}: {e}") from e


def evaluator_for(dataset, *, split: str, num_classes: int, inception: str | Path | None = None,
                  device: str = "cpu") -> Evaluator | None:
    """The feature network for an image data set and its reference features over `dataset` (one split): the
    shipped digits classifier for digits (images resized to its 16x16 input when needed), Inception-v3 from the
    local file `inception` otherwise; None when the data are not images or no feature network is available."""
    import torch.nn.functional as F

    spec = dataset.spec
    if spec.kind != "image":
        return None
    what = f"{spec.name} {split} split ({len(dataset)} images)"
    if spec.name == "digits":
        from . import classifier

        def to16(x: torch.Tensor) -> torch.Tensor:
            return x if tuple(x.shape[-2:]) == (16, 16) else F.interpolate(x, size=(16, 16), mode="bilinear",
                                                                          align_corners=False)

        def feats(x: torch.Tensor) -> torch.Tensor:
            return classifier.features(to16(x))

        def cls(x: torch.Tensor) -> torch.Tensor:
            return classifier.classify(to16(x))

        return Evaluator(data=what, reference_size=len(dataset), feature_net="quickstep digits classifier (fc1, 128-d)",
                         features=feats, ref_features=feats(dataset.x), classify=cls if num_classes == 10 else None)
    if inception is None:
        return None
    from .inception import inception_features, load_inception

    net = load_inception(inception, device=device)

    def ifeats(x: torch.Tensor) -> torch.Tensor:
        return inception_features(net, x.to(device)).cpu()

    return Evaluator(data=what, reference_size=len(dataset), feature_net="Inception-v3 pool3 (2048-d)",
                     features=ifeats, ref_features=ifeats(dataset.x), kid_normalize=False)


# ----------------------------------------------------------------------------------------------- text
def hardware() -> str:
    """One line describing the machine."""
    import os

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {dev}"


def fmt(v: Any, digits: int = 4) -> str:
    """A table cell: floats to `digits` significant digits (scientific outside [1e-3, 1e4)), booleans yes/no."""
    if isinstance(v, bool):
        return "**yes**" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v == 0 or 1e-3 <= abs(v) < 1e4:
            return f"{v:.{digits}g}"
        return f"{v:.{max(digits - 1, 1)}e}"
    return "-" if v is None else str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str],
                   headers: Sequence[str] | None = None, digits: dict[str, int] | None = None) -> str:
    """A GitHub markdown table of `columns` from `rows` (missing values: '-')."""
    digits = digits or {}
    lines = ["| " + " | ".join(headers or columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c), digits.get(c, 4)) for c in columns) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- plots
def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is in the train extra
        raise ImportError("report plots need matplotlib: pip install 'quickstep[train]'") from e
    return plt


def _save(fig, ax, path: Path, title: str) -> Path:
    plt = _plt()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_quality_vs_nfe(rows: list[dict[str, Any]], metric: str, path: Path, title: str) -> Path:
    """Line plot of `metric` against NFE (log x axis)."""
    fig, ax = _plt().subplots(figsize=(4.5, 3.2), dpi=120)
    pts = sorted((r["nfe"], r[metric]) for r in rows if metric in r)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
    ax.set_xscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    return _save(fig, ax, path, title)


def plot_quality_vs_latency(rows: list[dict[str, Any]], batch: str, path: Path, title: str,
                            teacher_row: str = "teacher") -> Path:
    """FD against latency at `batch` (log x), one marker per backend x steps row (x: flagged, square: teacher)."""
    fig, ax = _plt().subplots(figsize=(5, 3.6), dpi=120)
    for r in rows:
        lat = (r.get("latency") or {}).get(batch)
        if lat is None:
            continue
        marker = "x" if r.get("flagged") else ("s" if r["backend"] == teacher_row else "o")
        ax.scatter([lat["latency_ms"]], [r["fd"]], marker=marker, s=40)
        ax.annotate(f"{r['backend']} {r['nfe']} NFE", (lat["latency_ms"], r["fd"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"latency at batch {batch} (ms, median)")
    ax.set_ylabel("FD (lower is better)")
    ax.grid(alpha=0.3)
    return _save(fig, ax, path, title)


def plot_per_sigma(bands: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    """Per-sigma-band diagnostics (log-log), one line per diagnostic, band centres on x."""
    fig, ax = _plt().subplots(figsize=(5, 3.4), dpi=120)
    for name, vals in bands.items():
        xs = [math.sqrt(v["sigma_lo"] * v["sigma_hi"]) for v in vals]
        ys = [max(abs(v["mean"]), 1e-12) for v in vals]
        ax.plot(xs, ys, "o-", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sigma (band centre)")
    ax.set_ylabel("value (|mean|)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, ax, path, title)


def plot_samples(x: torch.Tensor, path: Path, title: str, mixture=None, max_images: int = 64) -> Path:
    """An image grid (images [N, C, H, W]) or a scatter over the true density's contours (2-D vectors)."""
    if x.ndim == 4:
        k = min(max_images, x.shape[0])
        nrow = int(math.ceil(math.sqrt(k)))
        imgs = ((x[:k].clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)  # [k, H, W, C]
        h, w, c = imgs.shape[1:]
        grid = torch.ones(nrow * h, nrow * w, c)
        for i in range(k):
            r, col = divmod(i, nrow)
            grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = imgs[i]
        fig, ax = _plt().subplots(figsize=(4, 4), dpi=120)
        ax.imshow(grid.squeeze(-1).numpy(), cmap="gray" if c == 1 else None, vmin=0, vmax=1)
        ax.axis("off")
    else:
        fig, ax = _plt().subplots(figsize=(4, 4), dpi=120)
        if mixture is not None and mixture.dim == 2:
            g = torch.linspace(-2, 2, 120, dtype=torch.float64)
            xx, yy = torch.meshgrid(g, g, indexing="xy")
            lp = mixture.log_prob(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)).reshape(120, 120)
            ax.contour(xx.numpy(), yy.numpy(), lp.numpy(), levels=8, linewidths=0.5, colors="grey")
        pts = x[:, :2] if x.shape[1] >= 2 else torch.cat([x, torch.zeros_like(x)], 1)
        ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=2, alpha=0.5)
        ax.set_xlim(-2, 2)
        ax.set_ylim(-2, 2)
        ax.set_aspect("equal")
    return _save(fig, ax, path, title)


__all__ = ["EvalDataError", "Evaluator", "ImagesFn", "as_float_images", "chunks", "dataset_args", "evaluator_for",
           "fmt", "hardware", "load_split", "markdown_table", "plot_per_sigma", "plot_quality_vs_latency",
           "plot_quality_vs_nfe", "plot_samples", "sample", "uint8_to_float"]
