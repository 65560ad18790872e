"""The objective protocol every training loss implements, the per-step context, and the registry.

How to add an objective (e.g. ``scm.py``)::

    from dataclasses import dataclass
    from .base import Batch, StepContext, register_objective

    @dataclass(frozen=True)
    class SCMConfig:                      # its hyper-parameters; every field needs a default
        weight: float = 1.0
        p_mean: float = -1.0
        p_std: float = 1.4

    @register_objective("scm", SCMConfig)
    class SCMLoss:
        '''sCM continuous-time consistency loss (Lu & Song 2025, Eq. 8).'''
        def __init__(self, config: SCMConfig):
            self.config = config
        def __call__(self, model, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
            t = ctx.training_t(self.config.p_mean, self.config.p_std, model.sigma_data)   # [b]
            z = model.sigma_data * ctx.randn(batch.x.shape[1:])                           # [b, ...]
            ...
            return {"scm": self.config.weight * loss}   # named scalars, already weighted

then import the module in ``losses/__init__.py`` so the decorator runs.  A preset enables it with a
``[objectives.scm]`` table (its keys are the config fields); ``--set objectives.scm.weight=2`` works too.

Rules an objective follows:
- it returns named scalar terms, already multiplied by their weights; the trainer sums them, checks
  each for NaN/Inf (naming the term) and logs each under its name.  Put detached diagnostics into
  ``ctx.metrics`` (logged, never summed).
- per-sample randomness comes from ``ctx.randn / ctx.rand / ctx.training_t``: these draw the GLOBAL
  batch from a generator shared by all ranks and return this rank's rows, so a DDP run on any number
  of processes reproduces the single-process run.  Anything else random uses ``ctx.generator``
  (identical on every rank).  Never the global torch RNG.
- the model is a ``TrigFlowModel`` (call ``forward/consistency/velocity/denoise/edm_score/logvar``;
  never re-derive a scaling); ``ctx.teacher`` is a frozen ``TrigFlowModel`` or None; objectives that
  need one set ``needs_teacher = True`` as a class attribute and the trainer refuses to start without.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from ..core import trigflow


@dataclass(frozen=True)
class Batch:
    """One rank's share of a training batch."""

    x: torch.Tensor  # [b, ...] clean data, images in [-1, 1] or vectors
    y: torch.Tensor | None = None  # [b] int64 class labels, or None for unconditional training

    @property
    def size(self) -> int:
        return int(self.x.shape[0])


ReferenceProvider = Callable[[int], Batch]  # n -> a reference batch of n samples (identical on every rank)


@dataclass
class StepContext:
    """Everything an objective may use besides the model and the batch, for one optimisation step."""

    step: int  # 0-based index of the step being taken
    total_steps: int
    generator: torch.Generator  # shared by every rank (same state everywhere)
    device: torch.device
    rank: int = 0
    world_size: int = 1
    teacher: Any = None  # frozen TrigFlowModel (eval mode, requires_grad False) or None
    references: ReferenceProvider | None = None  # STF reference batches: first rows are the global batch
    global_batch: Batch | None = None  # the whole batch of this step (all ranks); references start with it
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)  # detached diagnostics, logged not summed
    # (scalar tensors stay on the device until the trainer logs them; a Python number costs no device read either)
    skip_update: bool = False  # an objective asks the trainer not to apply this step (weights and EMA stay)
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def progress(self) -> float:
        """Fraction of training done before this step, in [0, 1]."""
        return self.step / max(self.total_steps, 1)

    @property
    def local_batch_size(self) -> int:
        assert self.global_batch is not None
        return self.global_batch.size // self.world_size

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        b = t.shape[0] // self.world_size
        return t[self.rank * b : (self.rank + 1) * b]

    def randn(self, tail: tuple[int, ...] | torch.Size = (), *, dtype=torch.float32) -> torch.Tensor:
        """Standard normal draws of shape [b, *tail] for this rank's samples."""
        n = self.local_batch_size * self.world_size
        g = torch.randn((n, *tail), generator=self.generator, device=self.generator.device, dtype=dtype)
        return self._rows(g).to(self.device)

    def rand(self, tail: tuple[int, ...] | torch.Size = (), *, dtype=torch.float32) -> torch.Tensor:
        """Uniform [0, 1) draws of shape [b, *tail] for this rank's samples."""
        n = self.local_batch_size * self.world_size
        g = torch.rand((n, *tail), generator=self.generator, device=self.generator.device, dtype=dtype)
        return self._rows(g).to(self.device)

    def training_t(self, p_mean: float, p_std: float, sigma_data: float) -> torch.Tensor:
        """TrigFlow training times t = arctan(e^tau / sigma_d), tau ~ N(P_mean, P_std^2).  [b]"""
        n = self.local_batch_size * self.world_size
        t = trigflow.sample_training_t(n, p_mean, p_std, sigma_data=sigma_data, generator=self.generator,
                                       device=self.generator.device)
        return self._rows(t).to(self.device)

    def shared(self, key: Any, make: Callable[[], Any]) -> Any:
        """Per-step cache: objectives that may share a draw (e.g. the same t and z) call `shared(key, fn)`."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


SAMPLERS = ("heun", "consistency")
# what an objective declares about itself (class attributes); `register_objective` fills in the defaults
DECLARATIONS: dict[str, Any] = {"needs_teacher": False, "init_from_teacher": False, "sampler": "heun"}


@runtime_checkable
class Objective(Protocol):
    """A training objective: `objective(model, batch, ctx)` -> named, weighted scalar loss terms.

    It declares `needs_teacher` (the trainer refuses to start without --teacher), `init_from_teacher` (the student
    starts as the teacher's EMA) and `sampler` ('heun' for diffusion models, 'consistency' for consistency models:
    how the trained model generates, recorded as the checkpoint's kind)."""

    config: Any
    needs_teacher: bool
    init_from_teacher: bool
    sampler: str

    def __call__(self, model: Any, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    config_cls: type
    factory: Callable[[Any], Objective]
    doc: str = ""

    @property
    def needs_teacher(self) -> bool:
        return bool(self.factory.needs_teacher)

    @property
    def init_from_teacher(self) -> bool:
        return bool(self.factory.init_from_teacher)

    @property
    def sampler(self) -> str:
        return str(self.factory.sampler)


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(name: str, config_cls: type) -> Callable[[type], type]:
    """Class decorator: make an objective available to configs as `[objectives.<name>]`."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config of objective {name!r} must be a dataclass")

    def deco(cls: type) -> type:
        if name in OBJECTIVES and OBJECTIVES[name].factory is not cls:
            raise ValueError(f"objective {name!r} is already registered")
        for attr, default in DECLARATIONS.items():
            if attr not in dir(cls):
                setattr(cls, attr, default)
        if cls.sampler not in SAMPLERS:
            raise ValueError(f"objective {name!r} declares sampler {cls.sampler!r}; valid samplers: {SAMPLERS}")
        OBJECTIVES[name] = ObjectiveSpec(name, config_cls, cls, (cls.__doc__ or "").strip().splitlines()[0]
                                         if cls.__doc__ else "")
        return cls

    return deco


def get_objective_spec(name: str) -> ObjectiveSpec:
    """The registered objective called `name`; a clear error listing the valid names otherwise."""
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; valid objectives: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def build_objective(name: str, config: Any) -> Objective:
    """Instantiate objective `name` with its config dataclass."""
    spec = get_objective_spec(name)
    if not isinstance(config, spec.config_cls):
        raise TypeError(f"objective {name!r} expects a {spec.config_cls.__name__}, got {type(config).__name__}")
    return spec.factory(config)
