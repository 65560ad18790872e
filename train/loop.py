"""The trainer: one loop for every objective (EDM-style training loop, Karras et al. 2022).

EMA with the half-life in images, Adam/RAdam, LR warm-up, gradient clipping, bf16 autocast on CUDA, a NaN/Inf
guard naming the step and the loss term, atomic checkpoints with exact resume, a progress bar, TensorBoard +
JSONL logs, PNG sample grids, and data parallelism through `torchrun` (gloo on CPU, NCCL on GPU).

Data parallelism: every rank draws the same global batch indices and the same global noise (shared generators,
see `losses.base.StepContext`) and keeps its own rows; gradients are averaged with an explicit all-reduce
after backward (DistributedDataParallel's reducer supports neither the double backward of the FP objective
nor losses that call model methods other than `forward`).  A run on W ranks therefore reproduces the
single-process run on the same global batch up to float summation order.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from quickstep.artifacts import CheckpointMeta, DataSpec, SamplerSpec, TeacherRef, sha256_file

from .config import TrainConfig, model_config
from .core import checkpoint as ckpt
from .core.model import TrigFlowModel, build_model
from .core.networks import ModelConfig
from .core.sampling import generate
from .core.trigflow import consistency_times
from .data import to_unit
from .losses import Batch, StepContext, build_objective, get_objective_spec
from .stream import DataFeed, InfiniteSampler

CKPT_PREFIX = ckpt.CKPT_PREFIX
find_checkpoint = ckpt.find_checkpoint  # a run directory -> its latest checkpoint


class DataScaleWarning(UserWarning):
    """The training data's std is far from the model's sigma_data (the TrigFlow preconditioning assumes them equal)."""


def data_std(dataset: Any, max_streamed: int = 1024) -> float:
    """The std of the training data over every element, in model space (what sigma_data should match).

    In-memory sets: every sample, accumulated in float64 chunks (uint8 images are never held as floats whole);
    streamed sources (zip / folder / tar): `max_streamed` samples evenly spaced over the set."""
    if hasattr(dataset, "data"):
        rows, n = dataset.data, len(dataset.data)
        chunks = (to_unit(rows[i:i + 4096]) for i in range(0, n, 4096))
    else:
        n = len(dataset)
        idx = np.linspace(0, n - 1, num=min(n, max_streamed)).round().astype(int)
        chunks = (to_unit(torch.from_numpy(np.ascontiguousarray(dataset.read(int(i))))) for i in idx)
    s = s2 = cnt = 0.0
    for c in chunks:
        c = c.detach().to(torch.float64)
        s, s2, cnt = s + float(c.sum()), s2 + float((c * c).sum()), cnt + c.numel()
    mean = s / cnt
    return float(np.sqrt(max(s2 / cnt - mean * mean, 0.0) * cnt / max(cnt - 1, 1)))


def data_scale_message(std: float, sigma_data: float, factor: float = 2.0) -> str | None:
    """A warning text when std and sigma_data differ by more than `factor` either way, else None."""
    if std > 0 and max(std / sigma_data, sigma_data / std) <= factor:
        return None
    return (f"the training data's std is {std:.4g} but model.sigma_data is {sigma_data:g} (more than {factor:g}x "
            f"apart): the TrigFlow preconditioning assumes data of std sigma_data, and sampling quality suffers. "
            f"Rescale the data, set model.sigma_data = {std:.3g}, or use model.sigma_data = \"auto\".")


class NonFiniteLossError(RuntimeError):
    """A loss term or the gradient became NaN/Inf; the message names the step and the term."""


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path | None  # the last checkpoint written (rank 0), or None
    step: int  # steps completed
    losses: list[float] = field(default_factory=list)  # total loss of every step run in this call
    logs: list[dict[str, float]] = field(default_factory=list)  # the records logged (every log.every steps)
    last: dict[str, float] = field(default_factory=dict)  # the last step's terms and diagnostics (its checkpoint's)


# ----------------------------------------------------------------------------------------------- helpers
def _on(option: str, device: torch.device) -> bool:
    """An "auto" | "on" | "off" option: auto = on for CUDA."""
    return option == "on" or (option == "auto" and device.type == "cuda")


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use device=cpu")
    return torch.device(name)


def _device_scalar(v: torch.Tensor | float | bool, device: torch.device) -> torch.Tensor:
    """A step's metric (a tensor or a Python number) as a detached float32 0-d tensor on `device`; a Python number is
    filled in on the device (torch.full), not copied from the host (a blocking copy on CUDA)."""
    if isinstance(v, torch.Tensor):
        return v.detach().to(device=device, dtype=torch.float32)
    return torch.full((), float(v), dtype=torch.float32, device=device)


def ema_beta(cfg: TrainConfig, images_seen: int) -> float:
    """EDM EMA decay per step: 0.5 ** (batch / halflife_images), half-life ramped up early (EDM train loop)."""
    halflife = cfg.ema.halflife_kimg * 1000
    if cfg.ema.rampup_ratio is not None:
        halflife = min(halflife, images_seen * cfg.ema.rampup_ratio)
    return 0.5 ** (cfg.batch_size / max(halflife, 1e-8))


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The LR at `step`: `optim.lr`, a linear warm-up over `optim.warmup_steps`, then `optim.decay` -- cosine or
    linear from lr (end of warm-up) to final_lr_ratio * lr (last step), or EDM2's inverse square root."""
    o = cfg.optim
    warm = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
    if o.decay == "inverse_sqrt":
        return o.lr * warm / math.sqrt(max(step / o.decay_ref_steps, 1.0))
    if o.decay == "constant":
        return o.lr * warm
    progress = min(1.0, max(0.0, (step - o.warmup_steps) / max(cfg.steps - 1 - o.warmup_steps, 1)))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if o.decay == "cosine" else 1.0 - progress
    return o.lr * warm * (o.final_lr_ratio + (1.0 - o.final_lr_ratio) * shape)


RESUME_GAP_S = 600.0  # two log.jsonl lines further apart than this are a stop and a --resume, not training time


def read_train_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """A run's log.jsonl rows that carry a step and a wall-clock time (what `Trainer.fit` writes every log.every)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: not a training run directory")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "step" in r and "time" in r]


def resume_gaps(rows: list[dict[str, Any]]) -> list[float]:
    """The gaps between consecutive log rows longer than RESUME_GAP_S: one per stop and --resume, in seconds."""
    return [b["time"] - a["time"] for a, b in zip(rows, rows[1:], strict=False) if b["time"] - a["time"] > RESUME_GAP_S]


def training_seconds(rows: list[dict[str, Any]]) -> list[float]:
    """Training seconds up to each log row: the sum of the gaps between consecutive rows, less any gap longer than
    RESUME_GAP_S (the time a run lay stopped before a --resume).  The first row is 0; one value per row."""
    out, total, prev = [], 0.0, None
    for row in rows:
        gap = 0.0 if prev is None else row["time"] - prev
        total += gap if 0.0 <= gap <= RESUME_GAP_S else 0.0
        out.append(total)
        prev = row["time"]
    return out


EXACT_TEACHER_PREFIX = "gmm:"  # --teacher gmm:<preset>: the mixture's analytic PF-ODE as the teacher


def exact_teacher_name(teacher: str | Path | None) -> str | None:
    """'ring8' for the teacher spec 'gmm:ring8', None for a checkpoint path; a clear error for an unknown preset."""
    if not isinstance(teacher, str) or not teacher.startswith(EXACT_TEACHER_PREFIX):
        return None
    from .data import GMM_PRESETS

    name = teacher[len(EXACT_TEACHER_PREFIX):]
    if name not in GMM_PRESETS:
        raise ValueError(f"unknown exact teacher {teacher!r}; valid: "
                         f"{', '.join(EXACT_TEACHER_PREFIX + k for k in GMM_PRESETS)} (or a checkpoint directory)")
    return name


def exact_teacher(name: str, sigma_data: float) -> TrigFlowModel:
    """The mixture `name`'s exact F* wrapped as a frozen TrigFlowModel (`eval.gmm_diagnostics.exact_model`)."""
    from .data import gmm_preset
    from .eval.gmm_diagnostics import exact_model

    return exact_model(gmm_preset(name), sigma_data=sigma_data).requires_grad_(False)


def teacher_record(teacher: str | Path) -> TeacherRef:
    """What a student's config.json records about its teacher: the sha256 of its model.safetensors and its
    checkpoint directory relative to the working directory (never an absolute path), so that `--resume` finds it
    again and notices if it changed.  An exact mixture teacher is recorded by its preset."""
    name = exact_teacher_name(teacher)
    if name is not None:
        return TeacherRef(exact=name)
    return TeacherRef.of(find_checkpoint(teacher))


def saved_teacher(checkpoint: str | Path) -> str | Path | None:
    """The teacher recorded in a student checkpoint's config.json, checked to still exist unchanged; None if the
    checkpoint records none.  Raises a CheckpointError naming the reference when it is gone or its weights changed."""
    checkpoint = find_checkpoint(checkpoint)
    rec = ckpt.load_meta(checkpoint).teacher
    if rec is None:
        return None
    if rec.exact is not None:
        return f"{EXACT_TEACHER_PREFIX}{rec.exact}"
    hint = "pass --teacher DIR to resume with a teacher checkpoint explicitly"
    if rec.ref is None:
        raise ckpt.CheckpointNotFoundError(f"{checkpoint} records its teacher only by hash (sha256 "
                                           f"{(rec.sha256 or '')[:12]}...; format 1 checkpoints kept an absolute "
                                           f"path, which is not carried over); {hint}")
    path = Path(rec.ref)
    if not ((path / ckpt.CONFIG).is_file() and (path / ckpt.WEIGHTS).is_file()):
        raise ckpt.CheckpointNotFoundError(f"the teacher recorded in {checkpoint} ({rec.ref!r}, relative to "
                                           f"{str(Path.cwd())!r}) no longer exists or is not a checkpoint directory; "
                                           f"{hint}")
    if sha256_file(path / ckpt.WEIGHTS) != rec.sha256:
        raise ckpt.CheckpointMismatchError(f"the teacher recorded in {checkpoint} ({rec.ref!r}) has changed since "
                                           f"the run started (sha256 of {ckpt.WEIGHTS} differs); {hint}")
    return path


def objectives_kind(objectives) -> str:
    """The kind of model a set of objectives trains: 'consistency' when one declares the consistency sampler."""
    return "consistency" if any(o.sampler == "consistency" for o in objectives) else "diffusion"


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------- images
def to_uint8_grid(images: torch.Tensor, nrow: int | None = None) -> Any:
    """[N, C, H, W] in [-1, 1] -> a PIL image grid (1-pixel gaps)."""
    from PIL import Image

    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    grid = torch.zeros(c, rows * (h + 1) + 1, nrow * (w + 1) + 1, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")


def scatter_png(points: torch.Tensor, size: int = 384, extent: float = 2.0) -> Any:
    """2-D samples [N, 2] (or 1-D [N, 1], drawn against a uniform jitter) -> a PIL scatter plot."""
    from PIL import Image, ImageDraw

    p = points.detach().float().cpu()
    if p.shape[1] == 1:
        p = torch.cat([p, torch.linspace(-extent * 0.9, extent * 0.9, p.shape[0])[:, None]], 1)
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    c = size / 2
    draw.line([(0, c), (size, c)], fill=(220, 220, 220))
    draw.line([(c, 0), (c, size)], fill=(220, 220, 220))
    for x, y in p[:, :2].tolist():
        u, v = c + x / extent * c, c - y / extent * c
        draw.ellipse([u - 1.5, v - 1.5, u + 1.5, v + 1.5], fill=(30, 80, 200))
    return img


def save_samples_png(samples: torch.Tensor, path: str | Path) -> Path:
    """Images [N, C, H, W] -> grid PNG; vectors [N, D] -> scatter PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = to_uint8_grid(samples) if samples.ndim == 4 else scatter_png(samples)
    img.save(path)
    return path


# ----------------------------------------------------------------------------------------------- trainer
@dataclass
class _PendingStep:
    """One step's device-resident record, read on the host at the next log interval (`Trainer._flush`)."""

    step: int  # 0-based index of the step
    lr: float
    names: list[str]  # the loss terms (summed)
    metric_names: list[str]  # the objectives' diagnostics (logged, not summed)
    values: torch.Tensor  # [terms + metrics + 1] float32, rank-averaged; the last entry is the skip request
    grad_norm: torch.Tensor  # [] the gradient norm before clipping


class Trainer:
    """Train a TrigFlowModel with the objectives of a TrainConfig.  `resume` continues a checkpoint exactly.

    Host reads (issue 18, as nanoGPT does): a step keeps its loss terms, diagnostics, gradient norm and skip request
    on the device; `fit` reads them (one transfer for all pending steps) only when it logs or checkpoints, and runs
    the NaN/Inf guard on them then.  With a fused Adam/AdamW (`device_guard`) the guard and an objective's skip
    request act on the device too: the optimizer's `found_inf` and a `torch.where` on the EMA leave weights, moments
    and EMA untouched on a skipped or non-finite step, and a non-finite step halts every later update until the read
    raises NonFiniteLossError naming it (the step counter is reset to it: no update was applied with a bad loss).
    The other optimizers (the for-loop Adam on CPU, RAdam) cannot skip an update on the device, so they read one
    flag (non-finite, skip) per step.  A time-boxed DDP run (max_seconds) also agrees on the deadline every step."""

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, *, resume: str | Path | None = None,
                 teacher: str | Path | None = None, dataset: Any = None):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self._refuse_overwrite(resume)
        self._setup_distributed()
        self._setup_device()
        self._setup_data(dataset)
        exact_name = self._setup_teacher(teacher, resume)
        self._setup_model(exact_name, warn_scale=resume is None)
        self._setup_optimiser()
        self._setup_objectives(resume)
        self._setup_state()
        self._resume(resume)
        self._setup_feed()  # after _resume: a streamed feed starts its DataLoader at the restored sampler position

    # -- construction, in the order __init__ runs it ----------------------------------------------
    def _refuse_overwrite(self, resume: str | Path | None) -> None:
        """A fresh run (or a resume of another run) into a directory that holds a run's checkpoints would overwrite
        them one save at a time: refuse, and say how to continue that run instead."""
        try:
            held = find_checkpoint(self.out_dir)
        except ckpt.CheckpointNotFoundError:
            return
        if resume is not None and self.out_dir.resolve() in (Path(resume).resolve(),
                                                             find_checkpoint(resume).resolve().parent):
            return
        raise ckpt.CheckpointError(
            f"--out {str(self.out_dir)!r} already holds a run (latest checkpoint {held.name}) that this run would "
            f"overwrite; continue it with --resume {str(self.out_dir)!r} (--steps N extends it), or choose another --out")

    def _setup_distributed(self) -> None:
        """torchrun's process group (gloo on CPU, NCCL on GPU), rank and world size."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            use_cuda = torch.cuda.is_available() and self.cfg.device != "cpu"
            dist.init_process_group("nccl" if use_cuda else "gloo")
        self.distributed = dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1

    def _setup_device(self) -> None:
        """The device (TF32 on CUDA), this rank's share of the batch and bf16 autocast."""
        cfg = self.cfg
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32
        if cfg.batch_size % self.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the world size {self.world_size}")
        self.local_batch = cfg.batch_size // self.world_size
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")

    def _setup_data(self, dataset: Any) -> None:
        """The training set (the config's unless one is given): data.Dataset (in memory) or sources.FileSource
        (streamed through a DataLoader)."""
        cfg = self.cfg
        if dataset is None:
            from .data import load_dataset

            d = cfg.data
            dataset = load_dataset(d.name, path=d.path, split=d.split, seed=cfg.seed, resolution=d.resolution,
                                   crop=d.crop, stream=True, **dict(d.options))
        self.dataset = dataset
        self.spec = dataset.spec
        if cfg.data.xflip and self.spec.kind != "image":
            raise ValueError(f"data.xflip mirrors images; {self.spec.name!r} is {self.spec.kind} data "
                             f"(set data.xflip=false)")

    def _setup_teacher(self, teacher: str | Path | None, resume: str | Path | None) -> str | None:
        """The frozen teacher checkpoint (given, or recorded in the checkpoint resumed) and what config.json records
        about it; returns the exact mixture teacher's name (built in _setup_model: it needs the student's
        sigma_data), or None."""
        self.teacher: TrigFlowModel | None = None
        self.teacher_info: TeacherRef | None = None  # saved in config.json: --resume finds the teacher again
        if teacher is None and resume is not None and self._needs_teacher():
            teacher = saved_teacher(resume)
        exact_name = exact_teacher_name(teacher)
        if teacher is not None:
            self.teacher_info = teacher_record(teacher)
        if teacher is not None and exact_name is None:
            self.teacher = ckpt.load_model(find_checkpoint(teacher), which="ema").to(self.device)
            self.teacher.eval().requires_grad_(False)
        return exact_name

    def _needs_teacher(self) -> list[str]:
        return [n for n in self.cfg.objectives if get_objective_spec(n).needs_teacher]

    def _setup_model(self, exact_name: str | None, *, warn_scale: bool) -> None:
        """The student on the device (GPU fast-path options), the exact teacher, the EMA and the compiled backbone."""
        cfg = self.cfg
        self.data_std = data_std(self.dataset)  # [issue 17] sigma_data should match it (one pass over the data)
        self.model = self._initial_model(exact_name)
        self.model.to(self.device).train()
        # [issue 21] GPU fast path: NHWC activations, fused optimizer kernels, a compiled backbone (options)
        if _on(cfg.channels_last, self.device):
            for m in (self.model, self.teacher):
                if m is not None:
                    m.set_channels_last(True)
        msg = data_scale_message(self.data_std, self.model.sigma_data)
        if msg is not None and self.rank == 0 and warn_scale:
            warnings.warn(msg, DataScaleWarning, stacklevel=3)
        if exact_name is not None:
            self.teacher = exact_teacher(exact_name, self.model.sigma_data).to(self.device)
        has_labels = (self.dataset.y if hasattr(self.dataset, "y") else self.dataset.labels) is not None
        self.conditional = self.model.num_classes > 0 and has_labels
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        if cfg.compile:  # in place: state_dict keys and the EMA stay those of the plain module
            self.model.backbone.compile(dynamic=False)

    def _initial_model(self, exact_name: str | None) -> TrigFlowModel:
        """[issue 4] The student's initial weights: the teacher's EMA with a fresh logvar head (sCD, Direct CM, CD),
        else init_from's EMA (its architecture), else freshly initialised from cfg.seed.  Also on resume: the
        student has the teacher's architecture (the preset's [model] is unused), and _resume then replaces the
        weights.  An exact teacher has no weights: the student is the preset's [model] (or init_from's network,
        with a fresh logvar head for the objectives that start from a teacher)."""
        cfg = self.cfg
        wants_teacher_init = any(get_objective_spec(n).init_from_teacher for n in cfg.objectives)
        if self.teacher is not None and not cfg.init_from and wants_teacher_init:
            from .losses.scm import init_student_from_teacher

            model = init_student_from_teacher(copy.deepcopy(self.teacher), self.teacher).requires_grad_(True)
            if tuple(model.sample_shape) != tuple(self.spec.shape):
                raise ValueError(f"teacher model samples {model.sample_shape}, data are {self.spec.shape}")
            return model
        if cfg.init_from:
            model = ckpt.load_model(find_checkpoint(cfg.init_from), which="ema")
            if tuple(model.sample_shape) != tuple(self.spec.shape):
                raise ValueError(f"init_from model samples {model.sample_shape}, data are {self.spec.shape}")
            if exact_name is not None and wants_teacher_init:
                from .losses.scm import init_student_from_teacher

                model = init_student_from_teacher(model, model)  # fresh logvar head
            return model
        mcfg: ModelConfig = model_config(cfg, self.spec, data_std=self.data_std)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return build_model(mcfg)

    def _setup_optimiser(self) -> None:
        """Adam / AdamW (fused kernels per optim.fused) or RAdam over the trainable parameters."""
        o = self.cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt_cls = {"radam": torch.optim.RAdam, "adamw": torch.optim.AdamW}.get(o.name, torch.optim.Adam)
        kernels = {} if o.name == "radam" else {"fused": _on(o.fused, self.device)}  # RAdam has no fused kernel
        self.optimizer = opt_cls(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, **kernels)
        # a fused Adam skips an update on the device (found_inf): the guard then needs no host read per step
        self.device_guard = bool(self.optimizer.defaults.get("fused"))

    def _setup_objectives(self, resume: str | Path | None) -> None:
        """The objectives in a canonical order (by name: the random draws of a step must not depend on the order of
        TOML tables or of the JSON the config round-trips through on resume) and the kind of model they train."""
        cfg = self.cfg
        self.objectives = {name: build_objective(name, cfg.objectives[name]) for name in sorted(cfg.objectives)}
        self.kind = objectives_kind(self.objectives.values())  # recorded in every checkpoint: nothing guesses it
        needs = self._needs_teacher()
        if self.teacher is None and needs:
            why = f" (checkpoint {resume} records none)" if resume is not None else ""
            raise ValueError(f"objective(s) {needs} need a teacher: pass --teacher DIR{why}")

    def _setup_state(self) -> None:
        """Shared generators (identical on every rank), the per-rank global RNG (dropout only), the step counters
        and the exact consistency-map probe."""
        cfg = self.cfg
        self.sampler = InfiniteSampler(len(self.dataset), cfg.seed, xflip=cfg.data.xflip)
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 2)
        torch.manual_seed(cfg.seed * 7919 + 17 * self.rank + 3)
        self.step = 0
        self.skipped_steps = 0  # optimizer updates skipped at an objective's request (see _step)
        self._pending: list[_PendingStep] = []  # steps run since the last host read (see _flush)
        self._halt = torch.zeros((), dtype=torch.bool, device=self.device)  # device_guard: a non-finite step seen
        self.map_probe = None  # [issue 17] exact consistency-map error of a student on mixture data, per log
        mixture = getattr(self.dataset, "mixture", None)
        if (self.rank == 0 and mixture is not None and cfg.log.map_error_n > 0 and self.model.num_classes == 0
                and self.kind == "consistency"):
            from .eval.gmm_diagnostics import ConsistencyMapProbe

            self.map_probe = ConsistencyMapProbe(mixture, sigma_data=self.model.sigma_data, n=cfg.log.map_error_n,
                                                 generator=torch.Generator().manual_seed(cfg.seed + 4242))

    def _resume(self, resume: str | Path | None) -> None:
        """Continue a checkpoint exactly; a fresh DDP run starts every rank from rank 0's weights."""
        if resume is not None:
            self._load(find_checkpoint(resume))
        elif self.world_size > 1:
            for t in list(self.model.state_dict().values()):
                dist.broadcast(t, 0)
            self.ema.load_state_dict(self.model.state_dict())

    def _setup_feed(self) -> None:
        cfg = self.cfg
        self.feed = DataFeed(self.dataset, self.sampler, device=self.device, batch_size=cfg.batch_size,
                             rank=self.rank, world_size=self.world_size, workers=cfg.data.workers,
                             prefetch=cfg.data.prefetch, conditional=self.conditional)

    # -- distributed ---------------------------------------------------------------------------
    def _allreduce_grads(self) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # -- one step ------------------------------------------------------------------------------
    def _references(self, global_batch: Batch):
        def provide(n: int) -> Batch:
            extra = max(n - global_batch.size, 0)
            idx = torch.randint(len(self.dataset), (extra,), generator=self.data_gen)
            rx, ry = self.feed.take(idx)
            x = torch.cat([global_batch.x, rx])
            y = None if global_batch.y is None or ry is None else torch.cat([global_batch.y, ry])
            return Batch(x, y)

        return provide

    def train_step(self) -> dict[str, float]:
        """One optimisation step; returns the (rank-averaged) loss terms and diagnostics as floats (a host read:
        `fit` runs `_step` and reads only at log intervals)."""
        self._step()
        return self._flush()[-1]

    def _step(self) -> None:
        """One optimisation step, leaving its record on the device (`self._pending`)."""
        cfg, step = self.cfg, self.step
        gx, gy, lx, ly = self.feed.next()
        global_batch = Batch(gx, gy)
        batch = Batch(lx, ly)
        ctx = StepContext(step=step, total_steps=cfg.steps, generator=self.noise_gen, device=self.device,
                          rank=self.rank, world_size=self.world_size, teacher=self.teacher,
                          references=self._references(global_batch), global_batch=global_batch)
        lr = learning_rate(cfg, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        terms: dict[str, torch.Tensor] = {}
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp
                    else contextlib.nullcontext())
        with autocast:
            for name, objective in self.objectives.items():
                out = objective(self.model, batch, ctx)
                for k, v in out.items():
                    if k in terms:
                        raise RuntimeError(f"loss term {k!r} returned by objective {name!r} is already taken")
                    terms[k] = v.float()
        if not terms:
            raise RuntimeError(f"step {step}: no objective returned a loss term")
        names = list(terms)
        metric_names = list(ctx.metrics)
        values = torch.stack([terms[k].detach() for k in names] +
                             [_device_scalar(ctx.metrics[k], self.device) for k in metric_names] +
                             [_device_scalar(ctx.skip_update, self.device)])  # the typed skip request
        if self.distributed:
            dist.all_reduce(values)
            values /= self.world_size
        total = sum(terms.values())
        total.backward()
        if self.distributed:
            self._allreduce_grads()
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).detach()
        self._pending.append(_PendingStep(step, lr, names, metric_names, values, grad_norm))
        bad = ~(torch.isfinite(values[: len(names)]).all() & torch.isfinite(grad_norm))
        # an objective may ask to skip the update (ctx.skip_update; sCM: non-finite tangent); any rank asking skips all
        skip = values[-1] > 0
        if self.device_guard:
            self._update_on_device(bad, skip)
        else:
            is_bad, is_skip = torch.stack([bad, skip]).tolist()  # the one host read per step (see the class doc)
            if is_bad:
                self._flush()  # raises NonFiniteLossError naming the step and the term
            if not is_skip:  # neither the weights nor their EMA move on a skipped step
                self.optimizer.step()
                self._update_ema()
        self.step += 1

    def _update_on_device(self, bad: torch.Tensor, skip: torch.Tensor) -> None:
        """The update, held on the device (fused Adam's found_inf, the EMA by torch.where) after a non-finite step
        (sticky until `_flush` raises) or when an objective asks to skip."""
        self._halt |= bad
        hold = self._halt | skip
        self.optimizer.found_inf = hold.float()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self._update_ema(hold)

    @torch.no_grad()
    def _update_ema(self, hold: torch.Tensor | None = None) -> None:
        beta = ema_beta(self.cfg, (self.step + 1) * self.cfg.batch_size)
        for pe, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
            if hold is None:
                pe.lerp_(p.detach(), 1 - beta)
            else:
                pe.copy_(torch.where(hold, pe, torch.lerp(pe, p.detach(), 1 - beta)))
        for be, b in zip(self.ema.buffers(), self.model.buffers(), strict=True):
            be.copy_(b if hold is None else torch.where(hold, be, b))

    def _flush(self) -> list[dict[str, float]]:
        """Read every pending step's record (one host transfer) and return each step's metrics as floats, in order;
        the NaN/Inf guard: a NonFiniteLossError naming the first non-finite step and term (the step counter is
        reset to it: no update was applied from it on)."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        flat = torch.cat([torch.cat([r.values, r.grad_norm.reshape(1).float()]) for r in pending]).tolist()
        outs, offset = [], 0
        for r in pending:
            n = len(r.names) + len(r.metric_names) + 1
            vals, grad_norm = flat[offset : offset + n], flat[offset + n]
            offset += n + 1
            for k, v in zip(r.names, vals, strict=False):
                if not math.isfinite(v):
                    self.step = r.step
                    raise NonFiniteLossError(f"step {r.step}: loss term {k!r} is {v} (not finite); stopping. Lower "
                                             "the learning rate, enable optim.grad_clip, or check the data.")
            if not math.isfinite(grad_norm):
                self.step = r.step
                raise NonFiniteLossError(f"step {r.step}: the gradient norm is {grad_norm} (not finite) although "
                                         f"every loss term ({', '.join(r.names)}) is finite; stopping.")
            self.skipped_steps += int(vals[-1] > 0)
            out = dict(zip(r.names + r.metric_names, vals[:-1], strict=True))
            out["loss"] = float(sum(vals[: len(r.names)]))
            out["grad_norm"] = grad_norm
            out["lr"] = r.lr
            out["skipped_steps"] = float(self.skipped_steps)
            outs.append(out)
        return outs

    # -- checkpoints ---------------------------------------------------------------------------
    def _rng_state(self) -> dict[str, Any]:
        cpu_states = [torch.get_rng_state()]
        if self.distributed:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, torch.get_rng_state())
            cpu_states = gathered
        state = {"noise": self.noise_gen.get_state(), "data": self.data_gen.get_state(),
                 "torch_cpu": torch.stack(cpu_states)}
        if self.device.type == "cuda":
            state["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def save(self, metrics: dict[str, float] | None = None) -> Path | None:
        """Write `out_dir/step-NNNNNNN` atomically (rank 0) and prune old ones (after the NaN guard has read every
        step run: no checkpoint holds a non-finite step)."""
        self._flush()
        rng = self._rng_state()
        path = None
        if self.rank == 0:
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "rng": rng,
                     "sampler": self.sampler.state_dict(), "world_size": self.world_size,
                     "skipped_steps": self.skipped_steps}
            data = self.spec.to_dict()
            if self.model.num_classes == 0:
                data["class_names"] = None
            extra = CheckpointMeta(
                model=self.model.config.to_dict(), kind=self.kind, sampler=self.sampler_spec(),
                data=DataSpec.model_validate(data), train=self.cfg.to_dict(),
                objectives=sorted(self.objectives), teacher=self.teacher_info, git_revision=_git_revision(),
                step=self.step, kimg=self.step * self.cfg.batch_size / 1000, metrics=metrics or {},
            ).to_json()
            path = ckpt.save_checkpoint(self.out_dir / f"{CKPT_PREFIX}{self.step:07d}", self.model, ema=self.ema,
                                        extra_config=extra, state=state)
            keep = self.cfg.log.keep_checkpoints
            if keep > 0:
                old = sorted((p for p in self.out_dir.iterdir() if re.fullmatch(rf"{CKPT_PREFIX}\d+", p.name)),
                             key=lambda p: int(p.name[len(CKPT_PREFIX):]))
                for p in old[:-keep]:
                    shutil.rmtree(p, ignore_errors=True)
        if self.distributed:
            dist.barrier()
        return path

    def _load(self, path: Path) -> None:
        raw = ckpt.load_model(path, which="raw")
        ema = ckpt.load_model(path, which="ema")
        if raw.config != self.model.config:
            raise ckpt.CheckpointMismatchError(f"checkpoint {path} holds a different model than the config describes")
        self.model.load_state_dict(raw.state_dict())
        self.ema.load_state_dict(ema.state_dict())
        state = ckpt.load_state(path, map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.sampler.load_state_dict(state["sampler"])
        rng = state["rng"]
        self.noise_gen.set_state(rng["noise"].cpu())
        self.data_gen.set_state(rng["data"].cpu())
        cpu = rng["torch_cpu"].cpu()
        torch.set_rng_state(cpu[self.rank] if int(state.get("world_size", 1)) == self.world_size else cpu[0])
        if self.device.type == "cuda" and "torch_cuda" in rng:
            torch.cuda.set_rng_state(rng["torch_cuda"].cpu(), self.device)

    def sampler_spec(self) -> SamplerSpec:
        """How this model generates (recorded in the checkpoint): sCM at its 1- and 2-step times (t_mid from the
        config when set, else the core default), or Heun."""
        if self.kind == "consistency":
            sd = self.model.sigma_data
            kw = {} if self.cfg.t_mid is None else {"t_mid": self.cfg.t_mid}
            return SamplerSpec(name="consistency", default_steps=1,
                               times={str(n): consistency_times(n, sigma_data=sd, **kw) for n in (1, 2)})
        return SamplerSpec(name="heun", default_steps=18)

    def map_error(self) -> dict[str, float]:
        """{'map_err/<band>': E||f_theta - Phi*||^2, ..., 'map_err_ema/...'} when a map probe is set, else {}."""
        if self.map_probe is None:
            return {}
        from .eval.gmm_diagnostics import map_error_scalars

        return {**map_error_scalars(self.map_probe(self.model), "map_err"),
                **map_error_scalars(self.map_probe(self.ema), "map_err_ema")}

    # -- samples -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, path: str | Path) -> Path | None:
        """EMA samples from fixed noise (Heun, log.sample_steps) as a PNG grid/scatter (rank 0)."""
        if self.rank != 0:
            return None
        n = self.cfg.log.sample_n if self.spec.kind == "image" else max(self.cfg.log.sample_n, 512)
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 12345)
        noise = torch.randn((n, *self.ema.sample_shape), generator=g, device=self.device)
        labels = (torch.arange(n, device=self.device) % self.ema.num_classes) if self.ema.num_classes > 0 else None
        # consistency students: 1-step samples (sCM Alg. 1); teachers: a Heun solve of log.sample_steps
        sampler = self.sampler_spec()
        steps = sampler.default_steps if sampler.name == "consistency" else self.cfg.log.sample_steps
        x = generate(self.ema, sampler.name, noise, steps, class_labels=labels)
        return save_samples_png(x, path)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, steps: int | None = None) -> TrainResult:
        """Run until cfg.steps (or `steps` more steps); checkpoints every log.ckpt_every steps and at the end."""
        cfg = self.cfg
        end = cfg.steps if steps is None else min(cfg.steps, self.step + steps)
        is_main = self.rank == 0
        if is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
        writer = None
        if is_main and cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard imports slowly

            writer = SummaryWriter(str(self.out_dir / "tb"))
        bar = None
        if is_main and cfg.log.progress:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=self.step, desc=cfg.name, dynamic_ncols=True)
        try:  # a resumed run that has nothing left to train still reports its last checkpoint
            prior = find_checkpoint(self.out_dir) if self.step > 0 else None
        except ckpt.CheckpointError:
            prior = None
        result = TrainResult(self.out_dir, prior, self.step)
        log_f = open(self.out_dir / "log.jsonl", "a") if is_main else None  # noqa: SIM115
        t_last, step_last = time.perf_counter(), self.step
        deadline = t_last + cfg.max_seconds if cfg.max_seconds > 0 else math.inf
        acc: dict[str, float] = {}
        n_acc = 0
        try:
            while self.step < end:
                self._step()
                if deadline < math.inf and self._past(deadline):  # max_seconds: this step is the last one
                    end = self.step
                log_now = self.step % cfg.log.every == 0 or self.step == end
                ckpt_now = self.step % cfg.log.ckpt_every == 0 or self.step == end
                if log_now or ckpt_now:  # the only host reads of the loop: the steps since the last one, at once
                    for out in self._flush():
                        result.losses.append(out["loss"])
                        result.last = out
                        for k, v in out.items():
                            acc[k] = acc.get(k, 0.0) + v
                        n_acc += 1
                if log_now:
                    now = time.perf_counter()
                    img_s = (self.step - step_last) * cfg.batch_size / max(now - t_last, 1e-9)
                    # the data pipeline's rate next to the training rate (both global images/s): the loader is the
                    # bottleneck when data_img_per_s approaches img_per_s (and data_wait_frac grows)
                    ds = self.feed.stats()
                    data_s = ds["data_img_per_s"] * self.world_size
                    wait = ds["data_wait_s"] / max(now - t_last, 1e-9)
                    self.feed.reset_stats()
                    t_last, step_last = now, self.step
                    rec = {k: v / n_acc for k, v in acc.items()}
                    rec.update(step=self.step, kimg=self.step * cfg.batch_size / 1000, img_per_s=img_s,
                               data_img_per_s=data_s, data_wait_frac=wait, time=time.time())
                    acc, n_acc = {}, 0
                    rec.update(self.map_error())
                    result.logs.append(rec)
                    if log_f is not None:
                        log_f.write(json.dumps(rec) + "\n")
                        log_f.flush()
                    if writer is not None:
                        for k, v in rec.items():
                            if k not in ("step", "time"):
                                writer.add_scalar(f"train/{k}", v, self.step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{img_s:.0f}", data_img_s=f"{data_s:.0f}")
                if bar is not None:
                    bar.update(1)
                if cfg.log.samples and cfg.log.sample_every > 0 and self.step % cfg.log.sample_every == 0:
                    self.sample_grid(self.out_dir / "samples" / f"{CKPT_PREFIX}{self.step:07d}.png")
                if ckpt_now:
                    result.checkpoint = self.save(result.last) or result.checkpoint
            if cfg.log.samples:
                self.sample_grid(self.out_dir / "samples" / "final.png")
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            if log_f is not None:
                log_f.close()
        result.step = self.step
        return result

    def _past(self, deadline: float) -> bool:
        """time.perf_counter() > deadline on any rank (all ranks stop at the same step)."""
        past = time.perf_counter() > deadline
        if self.distributed:
            flag = torch.tensor(float(past), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            past = bool(flag.item())
        return past

    def close(self) -> None:
        self.feed.close()
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig, out_dir: str | Path, *, resume: str | Path | None = None,
          teacher: str | Path | None = None, dataset: Any = None) -> TrainResult:
    """Build a Trainer and run it to cfg.steps."""
    trainer = Trainer(cfg, out_dir, resume=resume, teacher=teacher, dataset=dataset)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def config_from_checkpoint(path: str | Path) -> TrainConfig:
    """The TrainConfig saved in a checkpoint's config.json (for --resume)."""
    meta = ckpt.load_meta(find_checkpoint(path))
    if meta.train is None:
        raise ckpt.CheckpointFormatError(f"{path} has no training config; was it written by quickstep-train?")
    return TrainConfig.from_dict(meta.train)
