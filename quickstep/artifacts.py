"""The artefact contract between the stages: what a checkpoint and a bundle are (docs/bundle.md).

One neutral module that train, export, serve and eval all import, and that imports nothing heavy (pydantic and
numpy; never torch).  It owns

- the format names and versions, and the migration of older artefacts (`migrate_checkpoint`, `migrate_manifest`):
  an artefact of a version this code does not know fails with an `ArtifactError` naming the version;
- `CheckpointMeta`, the `config.json` of a checkpoint: written by the trainer, read by export and eval;
- `BundleManifest`, the `manifest.json` of a bundle: written and extended by export, read by serve and eval;
- `sha256_file`, the TensorRT plan tag (`plan_tag`) and the noise convention (`draw_noise`, `draw_labels`);
- `Runner`, the run interface of a loaded generator (`run(steps, noises, labels) -> uint8 NHWC images`), and the two
  entry-point groups through which one stage reaches another's code without importing it: `quickstep.runners`
  (`open_runner`: export's report runs the serve backends) and `quickstep.generators` (`load_generators`: the serve
  torch backend runs train.core's generator modules).

No artefact records a path of the machine that made it: the teacher is its sha256 and a relative reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal, Protocol

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

Kind = Literal["consistency", "diffusion"]
KINDS: tuple[str, ...] = ("consistency", "diffusion")

CHECKPOINT_FORMAT = "quickstep-checkpoint"
CHECKPOINT_FORMAT_VERSION = 2  # 2: kind, sampler and a relative teacher reference are recorded
BUNDLE_FORMAT = "quickstep-bundle"
BUNDLE_FORMAT_VERSION = 2  # 2: a relative teacher reference, class_names / class_aliases
CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"

# format 1 checkpoints did not record their kind; these were the objectives that made consistency models then
_V1_CONSISTENCY_OBJECTIVES = frozenset({"sct", "scd", "direct_cm", "cd"})


class ArtifactError(ValueError):
    """A checkpoint's config.json or a bundle's manifest.json is missing, malformed or of an unknown version."""


class BundleError(ArtifactError):
    """A bundle is missing, malformed or corrupt (the message says which file and why)."""


# ----------------------------------------------------------------------------------------------- helpers
def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def plan_tag(gpu_name: str, trt_version: str) -> str:
    """'<gpu name>.trt<version>' with filesystem-safe characters: the key of a TensorRT plan in a manifest (plans
    are tied to the GPU model and the TensorRT version that built them)."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "_", gpu_name).strip("_")
    return f"{gpu}.trt{trt_version}"


def triton_name(name: str) -> str:
    """A model name safe for a Triton repository directory."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def triton_model_name(bundle_name: str, kind: str, steps: int) -> str:
    """The Triton model name of a bundle's generator graph: NAME_{k}step (consistency) or NAME_heun{k} (diffusion);
    `quickstep-export triton` writes it and the server's v2 routes answer to it."""
    base = triton_name(bundle_name)
    return f"{base}_{steps}step" if kind == "consistency" else f"{base}_heun{steps}"


def draw_noise(seed: int, n: int, shape: tuple[int, ...], num_noise: int) -> list[np.ndarray]:
    """The noise convention (DESIGN.md): image k of a request with `seed` uses default_rng([seed, k]):
    standard_normal(shape, float32) for `noise`, the next draw for `noise2`, ... -> num_noise arrays [n, *shape].
    The same pixels whatever the image is batched with."""
    out = [np.empty((n, *shape), np.float32) for _ in range(num_noise)]
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        for j in range(num_noise):
            out[j][k] = rng.standard_normal(shape, dtype=np.float32)
    return out


def draw_labels(seed: int, n: int, num_classes: int, num_noise: int, shape: tuple[int, ...]) -> np.ndarray:
    """Class labels when a conditional model gets none: image k's label is the next draw of default_rng([seed, k])
    after its noise, integers(0, num_classes)."""
    labels = np.empty((n,), np.int64)
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        for _ in range(num_noise):
            rng.standard_normal(shape, dtype=np.float32)
        labels[k] = rng.integers(0, num_classes)
    return labels


def balanced_labels(n: int, num_classes: int) -> np.ndarray | None:
    """Class labels [n] balanced over the classes (k mod C) for conditional models, else None (evaluation)."""
    return (np.arange(n, dtype=np.int64) % num_classes) if num_classes > 0 else None


def nfe(kind: str, steps: int) -> int:
    """Network evaluations of `steps` sampler steps: consistency = steps, Heun (EDM Alg. 2) = 2 steps - 1."""
    return int(steps) if kind == "consistency" else 2 * int(steps) - 1


class Runner(Protocol):
    """A loaded generator of one bundle on one device (a serve backend satisfies it)."""

    def run(self, steps: int, noises: list[np.ndarray], labels: np.ndarray | None) -> np.ndarray:
        """noises: [B, C, H, W] float32 each (noise, noise2, ...); labels [B] int64 or None -> uint8 [B, H, W, C]."""

    def describe(self) -> str:
        """The backend and the device it runs on, e.g. 'onnxruntime (CPUExecutionProvider)'."""

    def close(self) -> None: ...


RUNNERS = "quickstep.runners"  # entry-point group: backend name -> factory(bundle_dir, backend, device, max_batch)
GENERATORS = "quickstep.generators"  # entry-point group: framework -> factory(bundle_dir, manifest, **layout)


def find_entry_point(group: str, name: str, hint: str) -> Any:
    """The object that entry point `name` of `group` names (loaded), or an ArtifactError listing what is installed
    and `hint` (which extra provides it).  How one stage reaches another's code without importing it."""
    from importlib.metadata import distributions

    # every distribution's entry points, not the name-deduplicated `entry_points()`: a stale quickstep.egg-info
    # in the working directory of a source checkout must not hide the installed metadata
    found = {e.name: e for d in distributions() for e in d.entry_points if e.group == group}
    if name not in found:
        raise ArtifactError(f"no {group!r} entry point {name!r} is installed (installed: {sorted(found) or 'none'}); "
                            f"{hint}")
    return found[name].load()


def open_runner(bundle_dir: str | Path, backend: str, *, device: str = "cpu", max_batch: int = 64) -> Runner:
    """A loaded `Runner` of a bundle on `backend`, from the package that registered that backend under the
    `quickstep.runners` entry-point group (the serve extra registers onnxruntime, tensorrt, torch and aoti), so a
    stage that measures served generators (export's report) does not import the server."""
    factory = find_entry_point(RUNNERS, backend, "the serve extra provides onnxruntime, tensorrt, torch and aoti: "
                                                 "pip install 'quickstep[serve]'")
    return factory(bundle_dir, backend, device=device, max_batch=max_batch)


def load_generators(bundle_dir: str | Path, manifest: BundleManifest, framework: str = "torch", *,
                    device: str = "cpu", dtype: str = "float32", channels_last: bool = False) -> dict[int, Any]:
    """The whole-sampler generator module of every step count of a bundle, built from its weights by the package
    that registered `framework` under the `quickstep.generators` entry-point group (train.core registers `torch`:
    `quickstep.train.core.generator.bundle_generators`), so the server's torch backend runs train.core's samplers
    without importing train.  `dtype` / `channels_last` lay the network out for fast inference.  ArtifactError
    when no such factory is installed or the bundle's weights cannot be loaded."""
    factory = find_entry_point(GENERATORS, framework, "quickstep itself registers 'torch' "
                                                      "(quickstep.train.core.generator:bundle_generators); "
                                                      "reinstall quickstep (pip install -e .)")
    return factory(bundle_dir, manifest, device=device, dtype=dtype, channels_last=channels_last)


def relative_ref(path: str | Path, base: str | Path | None = None) -> str | None:
    """`path` relative to `base` (default: the working directory), POSIX-style: how an artefact refers to another
    directory (never by an absolute machine path); None when no relative path exists (another drive)."""
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(base or Path.cwd()).resolve())).as_posix()
    except ValueError:
        return None


def _is_absolute(ref: str) -> bool:
    return PurePosixPath(ref).is_absolute() or PureWindowsPath(ref).is_absolute() or ref.startswith("~")


def _relative(v: str | None) -> str | None:
    if v is not None and _is_absolute(v):
        raise ValueError(f"{v!r} is an absolute path; artefacts record relative references only")
    return v


RelativeRef = Annotated[str | None, AfterValidator(_relative)]  # a path relative to a documented base, or None


class _Model(BaseModel):
    """Unknown keys are kept (a newer minor writer, hand-added provenance) and written back unchanged."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, protected_namespaces=())

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


# ----------------------------------------------------------------------------------------------- shared parts
class TeacherRef(_Model):
    """The teacher a student was distilled from: the sha256 of its model.safetensors and a reference to find it
    again, relative to the working directory of the run that recorded it (never an absolute machine path)."""

    sha256: str | None = None  # of its model.safetensors (None for an exact teacher: it has no weights)
    ref: RelativeRef = None
    exact: str | None = None  # an analytic teacher: the Gaussian-mixture preset whose exact PF-ODE it is

    @classmethod
    def of(cls, checkpoint_dir: str | Path, *, base: str | Path | None = None) -> TeacherRef:
        """The reference of a teacher checkpoint directory: its weights' hash and its path relative to `base`
        (default: the working directory)."""
        path = Path(checkpoint_dir).resolve()
        return cls(sha256=sha256_file(path / CHECKPOINT_WEIGHTS), ref=relative_ref(path, base))


class DataSpec(_Model):
    """What the model was trained on: the data set's name, sample kind and shape, classes and their names."""

    name: str
    kind: Literal["image", "vector"] = "image"
    shape: tuple[int, ...]
    num_classes: int = 0
    class_names: list[str] | None = None  # index-aligned with the class labels
    class_aliases: dict[str, int] = Field(default_factory=dict)  # extra prompt words, e.g. "seven" -> 7


class DataSource(_Model):
    """Where a checkpoint's training data came from: the data loader's arguments and the run's seed."""

    name: str
    path: str | None = None
    resolution: int | None = None
    split: str = "train"
    crop: str = "none"
    options: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0


class SamplerSpec(_Model):
    """How the model generates: `consistency` (sCM 1-/2-step at `times`) or `heun` (EDM Alg. 2, `default_steps`)."""

    name: Literal["consistency", "heun"]
    default_steps: int = 1
    times: dict[str, list[float]] = Field(default_factory=dict)  # consistency: steps -> TrigFlow times

    @field_validator("times")
    @classmethod
    def _times(cls, v: dict[str, list[float]]) -> dict[str, list[float]]:
        import math

        for k, ts in v.items():
            if not str(k).isdigit() or int(k) < 1 or len(ts) != int(k) or any(not 0 < t < math.pi / 2 for t in ts) \
                    or any(b >= a for a, b in zip(ts[:-1], ts[1:], strict=False)):
                raise ValueError(f"times[{k!r}] = {list(ts)} must hold {k} decreasing times in (0, pi/2)")
        return v

    def times_for(self, steps: int) -> list[float] | None:
        """The recorded consistency times of `steps`, None when none are recorded (the sampler's default)."""
        ts = self.times.get(str(steps))
        return None if ts is None else list(ts)


def sampler_for(kind: str) -> str:
    return "consistency" if kind == "consistency" else "heun"


# ----------------------------------------------------------------------------------------------- checkpoint
class CheckpointMeta(_Model):
    """config.json of a checkpoint (DESIGN.md, Artifacts): the model, its kind and sampler, the data, the teacher."""

    format: Literal["quickstep-checkpoint"] = CHECKPOINT_FORMAT
    format_version: int = CHECKPOINT_FORMAT_VERSION
    model: dict[str, Any]  # train.core.networks.ModelConfig.to_dict(); train.core validates it
    kind: Kind
    sampler: SamplerSpec
    data: DataSpec | None = None
    train: dict[str, Any] | None = None  # the TrainConfig that made it (quickstep-train --resume)
    objectives: list[str] = Field(default_factory=list)
    teacher: TeacherRef | None = None
    git_revision: str | None = None
    step: int | None = None
    kimg: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_sampler(cls, data: Any) -> Any:
        """The sampler follows the recorded kind unless given (consistency: 1 step; diffusion: Heun, 18 steps)."""
        if isinstance(data, dict) and "sampler" not in data and data.get("kind") in KINDS:
            kind = data["kind"]
            data = {**data, "sampler": {"name": sampler_for(kind), "default_steps": 1 if kind == "consistency" else 18}}
        return data

    @classmethod
    def from_json(cls, raw: Any, where: str = CHECKPOINT_CONFIG) -> CheckpointMeta:
        """Validate (after migrating an older format) a parsed config.json; ArtifactError naming the problem."""
        return _validate(cls, migrate_checkpoint(raw, where), where)

    @classmethod
    def read(cls, checkpoint_dir: str | Path) -> CheckpointMeta:
        f = Path(checkpoint_dir) / CHECKPOINT_CONFIG
        return cls.from_json(_read_json(f), str(f))

    @property
    def train_data(self) -> DataSource | None:
        """The loader arguments of the training data (train.data of the TrainConfig) and its seed."""
        if not self.train or not isinstance(self.train.get("data"), dict):
            return None
        return DataSource.model_validate({**self.train["data"], "seed": int(self.train.get("seed", 0))})


_V1_MODEL_DEFAULTS = {"sigma_data": 0.5, "logvar_channels": 64}  # format 1's ModelConfig defaults


def migrate_checkpoint(raw: Any, where: str = CHECKPOINT_CONFIG) -> dict[str, Any]:
    """A checkpoint config.json of any known format version, as the current version's dict.

    1 -> 2: `kind` from the objectives (the consistency objectives of format 1: sct, scd, direct_cm, cd), the
    sampler from the kind, the teacher's absolute path replaced by its hash (and no reference), the model section's
    omitted defaults (sigma_data 0.5, logvar_channels 64) filled in."""
    if not isinstance(raw, dict):
        raise ArtifactError(f"{where} is not a JSON object; not a Quickstep checkpoint config")
    if raw.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise ArtifactError(f"{where}: format {raw.get('format')!r} is not {CHECKPOINT_FORMAT!r}")
    version = raw.get("format_version", 1)
    if version not in (1, CHECKPOINT_FORMAT_VERSION):
        raise ArtifactError(f"{where}: checkpoint format_version {version!r} is not supported (this Quickstep "
                            f"reads versions 1 and {CHECKPOINT_FORMAT_VERSION}); upgrade Quickstep to read it")
    out = dict(raw)
    if "consistency_times" in out:  # written by format 1 trainers (issue 17) before the sampler section existed
        times = out.pop("consistency_times")
        kind = out.get("kind") if out.get("kind") in KINDS else "consistency"
        sampler = dict(out.get("sampler") or {"name": sampler_for(kind), "default_steps": 1})
        out["sampler"] = {**sampler, "times": {**(sampler.get("times") or {}), **(times or {})}}
    if version == 1:
        if "model" not in out:
            raise ArtifactError(f"{where} has no 'model' section; not a Quickstep checkpoint config")
        names = out.get("objectives") or list((out.get("train") or {}).get("objectives") or {})
        kind = out.get("kind") if out.get("kind") in KINDS else (
            "consistency" if _V1_CONSISTENCY_OBJECTIVES.intersection(names) else "diffusion")
        out["kind"] = kind
        out["teacher"] = _migrate_teacher(out.get("teacher"))
        if isinstance(out["model"], dict):  # format 1 omitted the model defaults of its day
            out["model"] = {**_V1_MODEL_DEFAULTS, **out["model"]}
        if isinstance(out.get("data"), dict):  # format 1 trainers (issue 23) wrote the class names top-level
            data = dict(out["data"])
            for key in ("class_names", "class_aliases"):
                if out.get(key) is not None and data.get(key) is None:
                    data[key] = out[key]
                out.pop(key, None)
            out["data"] = data
        out["format_version"] = CHECKPOINT_FORMAT_VERSION
    out["format"] = CHECKPOINT_FORMAT
    return out


def _migrate_teacher(rec: Any) -> dict[str, Any] | None:
    """Format 1 recorded {'path': absolute dir, 'sha256': ...}: keep the hash, keep the path only if relative."""
    if isinstance(rec, dict) and rec.get("exact"):
        return {"exact": str(rec["exact"])}
    if not isinstance(rec, dict) or not rec.get("sha256"):
        return None
    ref = rec.get("ref", rec.get("path"))
    return {"sha256": rec["sha256"], "ref": ref if isinstance(ref, str) and not _is_absolute(ref) else None}


# ----------------------------------------------------------------------------------------------- bundle
class TensorSpec(_Model):
    """One graph input/output: name, dtype and shape ('batch' marks the dynamic axis)."""

    name: str
    dtype: str = "float32"
    shape: tuple[int | str, ...] = ()


class GraphEntry(_Model):
    """The generator graph of one step count (or the denoiser): one file per backend and the graph's I/O."""

    onnx: str | None = None
    aoti: str | None = None
    tensorrt: str | None = None  # the latest TensorRT build; every build is in tensorrt_plans
    tensorrt_plans: dict[str, str] = Field(default_factory=dict)  # plan_tag -> file
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)

    @property
    def files(self) -> dict[str, str]:
        """backend key ('onnx', 'aoti', 'tensorrt', or an extra key naming a file) -> file name in the bundle."""
        out = {k: v for k, v in (("onnx", self.onnx), ("aoti", self.aoti), ("tensorrt", self.tensorrt)) if v}
        out.update({k: v for k, v in (self.model_extra or {}).items() if isinstance(v, str)})
        return out

    @property
    def noise_inputs(self) -> tuple[str, ...]:
        """Names of the standard-normal inputs, in draw order (noise, noise2, ...)."""
        return tuple(i.name for i in self.inputs if i.name.startswith("noise"))

    @property
    def has_labels(self) -> bool:
        return any(i.name == "class_labels" for i in self.inputs)

    def plan(self, tag: str) -> str | None:
        """The TensorRT plan file built for `tag` (plan_tag: GPU model and TensorRT version), None when absent."""
        return self.tensorrt_plans.get(tag)

    def io_dict(self) -> dict[str, Any]:
        return {"inputs": [s.to_json() for s in self.inputs], "outputs": [s.to_json() for s in self.outputs]}


class FileEntry(_Model):
    sha256: str
    bytes: int | None = None


class TorchFiles(_Model):
    weights: str
    config: str


class QualityMetrics(_Model):
    """Sample quality of one generator setting (the evaluation pipeline's metrics) and its cost in NFE."""

    fd: float | None = None
    kid: float | None = None
    precision: float | None = None
    recall: float | None = None
    class_accuracy: float | None = None
    nfe: int | None = None


class QualityEntry(QualityMetrics):
    """One backend x steps row of `quickstep-export report` as stored in the manifest."""

    fd_torch: float | None = None
    fd_margin: float | None = None
    flagged: bool = False
    latency_ms: dict[str, float] = Field(default_factory=dict)
    throughput_img_s: dict[str, float] = Field(default_factory=dict)
    device: str | None = None  # what it was measured on, e.g. 'onnxruntime (CPUExecutionProvider)'

    def latency_at(self, batch: int) -> float | None:
        """Median latency in ms of one call at batch size `batch`, None when not measured."""
        return self.latency_ms.get(str(batch))


class QualityTeacher(QualityMetrics):
    """The teacher row of the report: its quality at its NFE and a relative reference to its checkpoint."""

    checkpoint: RelativeRef = None


class QualityTolerance(_Model):
    """How the report decided `flagged`: |FD - FD_torch| > max(relative * FD_torch, seed_spread[steps], floor)."""

    relative: float | None = None
    floor: float | None = None
    seed_spread: dict[str, float] | None = None  # steps -> range of the torch FD over spread_runs seeds
    spread_runs: int | None = None
    torch_fd_by_seed: dict[str, list[float]] | None = None  # steps -> torch FD of each seed
    rule: str | None = None


class QualityFlag(_Model):
    """One flagged backend x steps of the report: its FD against the torch reference and the allowed margin."""

    backend: str
    steps: int
    fd: float
    fd_torch: float
    fd_margin: float


class Quality(_Model):
    """The manifest's `quality` section, written by `quickstep-export report`."""

    report_version: int = 1
    created: str | None = None
    n: int | None = None
    seed: int | None = None
    data: str | None = None
    feature_net: str | None = None
    hardware: str | None = None
    reference_backend: str | None = None
    tolerance: QualityTolerance = Field(default_factory=QualityTolerance)
    backends: dict[str, dict[str, QualityEntry]] = Field(default_factory=dict)  # backend -> steps -> entry
    teacher: QualityTeacher | None = None
    flagged: list[QualityFlag] = Field(default_factory=list)

    def entries(self, backend: str) -> dict[str, QualityEntry]:
        """steps -> entry of `backend` (empty when the report did not measure it)."""
        return dict(self.backends.get(backend) or {})

    def flags(self, backend: str) -> list[tuple[str, QualityEntry]]:
        """(steps, entry) of every flagged entry of `backend`, by steps."""
        return [(k, e) for k, e in sorted(self.entries(backend).items()) if e.flagged]


_MAX_ABS_ERR = re.compile(r"^max_abs_err_b(\d+)$")


class ParityEntry(_Model):
    """One graph's parity gate (export): the largest |exported - torch| at each batch size (`max_abs_err_b{N}` in
    the JSON), in `units` ('uint8 levels' for generators, 'relative max abs' for the denoiser), and whether it
    stayed within `tolerance`.  Extra keys (AOTInductor compile timings, TensorRT build_s) are kept."""

    units: str
    reference: str | None = None  # what it was compared with when not eager torch (TensorRT: onnxruntime)
    max_abs_err: dict[int, float] = Field(default_factory=dict)  # batch size -> error
    tolerance: float
    passed: bool

    @model_validator(mode="before")
    @classmethod
    def _fold_errors(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_abs_err" not in data:
            errs = {int(m.group(1)): v for k, v in data.items() if (m := _MAX_ABS_ERR.match(str(k)))}
            data = {k: v for k, v in data.items() if not _MAX_ABS_ERR.match(str(k))} | {"max_abs_err": errs}
        return data

    @model_serializer(mode="wrap")
    def _flat_errors(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The JSON keeps one `max_abs_err_b{N}` key per batch size, where the errors dict sits."""
        out: dict[str, Any] = {}
        for k, v in handler(self).items():
            if k == "max_abs_err":
                out.update({f"max_abs_err_b{b}": e for b, e in v.items()})
            else:
                out[k] = v
        return out

    @property
    def worst(self) -> float:
        return max(self.max_abs_err.values(), default=0.0)

    def errors_text(self) -> str:
        """'b1=0, b7=0.5': the error at each batch size."""
        return ", ".join(f"b{b}={e:g}" for b, e in self.max_abs_err.items())

    def summary(self) -> str:
        """'b1=0, b7=2 uint8 levels, tolerance 1: failed' (an error of inf - wrong output shape - stays inf)."""
        return f"{self.errors_text()} {self.units}, tolerance {self.tolerance:g}: {'passed' if self.passed else 'failed'}"

    def with_extra(self, **extra: Any) -> ParityEntry:
        """This entry with more recorded keys (timings)."""
        return ParityEntry.model_validate({**self.to_json(), **extra})


class Parity(_Model):
    """The manifest's `parity` section: backend -> graph key ('1', '2', 'denoiser') -> the gate's entry; TensorRT
    per plan tag (plans are tied to one GPU model and TensorRT version)."""

    onnxruntime: dict[str, ParityEntry] | None = None
    aoti: dict[str, ParityEntry] | None = None
    tensorrt: dict[str, dict[str, ParityEntry]] | None = None  # plan_tag -> graph key -> entry

    def entry(self, backend: Literal["onnxruntime", "aoti"], key: str) -> ParityEntry | None:
        return (getattr(self, backend) or {}).get(key)

    def record(self, backend: Literal["onnxruntime", "aoti", "tensorrt"], key: str, entry: ParityEntry,
               tag: str | None = None) -> None:
        """Store the gate's entry of graph `key` (TensorRT: under its plan `tag`)."""
        if backend == "tensorrt":
            if tag is None:
                raise ValueError("a TensorRT parity entry needs the plan tag")
            plans = dict(self.tensorrt or {})
            plans[tag] = {**plans.get(tag, {}), key: entry}
            self.tensorrt = plans
        else:
            setattr(self, backend, {**(getattr(self, backend) or {}), key: entry})


class TensorRTBuild(_Model):
    """How the TensorRT plans of one plan tag were built (`quickstep-export tensorrt`)."""

    trt_version: str
    batch_buckets: list[int] = Field(default_factory=list)  # one optimisation profile each
    strongly_typed: bool | None = None
    precision: Literal["fp32", "fp16"] | None = None


class ExternalData(_Model):
    """The one weights file the ONNX graphs share (export.onnx.share_weights)."""

    file: str
    tensors: int | None = None
    unique: int | None = None
    inline_bytes: int | None = None
    data_bytes: int | None = None

    @field_validator("file")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if Path(v).name != v or v.startswith("."):
            raise ValueError(f"external-data file {v!r} must be a plain file name inside the bundle")
        return v


class AotiSection(_Model):
    device: str | None = None  # 'cpu' | 'cuda': what the packages were compiled for
    max_batch: int | None = None
    torch_version: str | None = None


class BundleManifest(_Model):
    """manifest.json of a bundle (docs/bundle.md)."""

    format: Literal["quickstep-bundle"] = BUNDLE_FORMAT
    format_version: int = BUNDLE_FORMAT_VERSION
    name: str
    kind: Kind
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int = 0
    class_names: list[str] | None = None
    class_aliases: dict[str, int] = Field(default_factory=dict)
    steps_supported: list[int]
    default_steps: int
    sigma_data: float = 0.5
    times: dict[str, list[float]] = Field(default_factory=dict)
    sigmas: dict[str, list[float]] | None = None
    nfe: dict[str, int] | None = None
    graphs: dict[str, GraphEntry]
    denoiser: GraphEntry | None = None
    torch: TorchFiles | None = None
    exporter: str | None = None
    opset: int | None = None
    precision: Literal["fp32", "fp16"] = "fp32"
    parity: Parity = Field(default_factory=Parity)
    export_seconds: dict[str, float] = Field(default_factory=dict)
    files: dict[str, FileEntry] = Field(default_factory=dict)
    onnx_external_data: ExternalData | None = None
    teacher: TeacherRef | None = None
    quality: Quality | None = None
    aoti: AotiSection | None = None
    tensorrt: dict[str, TensorRTBuild] | None = None  # plan_tag -> how its plans were built
    created: str | None = None
    quickstep_version: str | None = None

    @field_validator("steps_supported")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("steps_supported is empty")
        return sorted(int(s) for s in v)

    @field_validator("kind", mode="before")
    @classmethod
    def _kind(cls, v: Any) -> Any:
        if v not in KINDS:
            raise ValueError(f"kind must be 'consistency' or 'diffusion', got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> BundleManifest:
        missing = [s for s in self.steps_supported if str(s) not in self.graphs]
        if missing:
            raise ValueError(f"steps_supported {self.steps_supported} without graphs for {missing}")
        if self.default_steps not in self.steps_supported:
            raise ValueError(f"default_steps {self.default_steps} is not in steps_supported {self.steps_supported}")
        for k, g in self.graphs.items():
            if not g.noise_inputs:
                raise ValueError(f"graph for steps={k} has no 'noise' input")
        if self.class_names is not None:
            if not all(x.strip() for x in self.class_names):
                raise ValueError("class_names must be a list of non-empty strings or null")
            if len(self.class_names) != self.num_classes:
                raise ValueError(f"class_names has {len(self.class_names)} names for num_classes {self.num_classes}")
        if not all(k.strip() and 0 <= v < self.num_classes for k, v in self.class_aliases.items()):
            raise ValueError(f"class_aliases must map non-empty words to class indices 0..{self.num_classes - 1}")
        return self

    def parity_tolerance(self, backend: Literal["onnxruntime", "aoti"], key: str) -> float | None:
        """The tolerance export's parity gate used for graph `key` on `backend` (None when not recorded)."""
        entry = self.parity.entry(backend, key)
        return None if entry is None else entry.tolerance

    def graph(self, steps: int) -> GraphEntry:
        return self.graphs[str(steps)]

    @property
    def times_by_steps(self) -> dict[int, list[float]]:
        return {int(k): list(v) for k, v in self.times.items()}

    def consistency_times(self, steps: int) -> list[float] | None:
        """The sampler times a consistency bundle records for `steps` (baked into its graphs); None for a diffusion
        bundle or when none are recorded (the generator then uses its default 1-/2-step times)."""
        ts = self.times.get(str(steps)) if self.kind == "consistency" else None
        return None if ts is None else list(ts)

    def graph_file(self, steps: int, key: str) -> str | None:
        """The file of backend `key` ('onnx', 'aoti', 'tensorrt', ...) of the graph for `steps`, None when absent."""
        return self.graph(steps).files.get(key)

    @classmethod
    def from_json(cls, raw: Any, where: str = MANIFEST) -> BundleManifest:
        """Validate (after migrating an older format) a parsed manifest.json; BundleError naming the problem."""
        return _validate(cls, migrate_manifest(raw, where), where, BundleError)

    @classmethod
    def read(cls, bundle_dir: str | Path) -> BundleManifest:
        """manifest.json of a bundle directory; BundleError when it is missing, malformed or of an unknown version."""
        bundle_dir = Path(bundle_dir)
        if not bundle_dir.exists():
            raise BundleError(f"bundle directory {str(bundle_dir)!r} does not exist")
        if not bundle_dir.is_dir():
            raise BundleError(f"{str(bundle_dir)!r} is a file; a bundle is a directory with {MANIFEST}")
        f = bundle_dir / MANIFEST
        if not f.is_file():
            raise BundleError(f"{str(bundle_dir)!r} has no {MANIFEST}; is it a bundle written by `quickstep-export`?")
        return cls.from_json(_read_json(f, BundleError), str(f))

    def write(self, bundle_dir: str | Path) -> Path:
        """Write manifest.json atomically (temporary file, fsync, rename; readable by other users)."""
        bundle_dir = Path(bundle_dir)
        fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=bundle_dir)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.to_json(), indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600: a server running as another user must read it
        os.replace(tmp, bundle_dir / MANIFEST)
        return bundle_dir / MANIFEST

    def referenced_files(self) -> list[str]:
        """Every file the manifest points at (graphs of every backend, TensorRT plans, the torch files)."""
        graphs = [*self.graphs.values(), *([self.denoiser] if self.denoiser else [])]
        refs = [f for g in graphs for f in g.files.values()]
        refs += [f for g in graphs for f in g.tensorrt_plans.values()]
        if self.torch is not None:
            refs += [self.torch.weights, self.torch.config]
        return refs


def migrate_manifest(raw: Any, where: str = MANIFEST) -> dict[str, Any]:
    """A manifest.json of any known format version, as the current version's dict.

    1 -> 2: the teacher's absolute build-machine path is dropped from `teacher` (its sha256 stays) and from the
    quality report's teacher row."""
    if not isinstance(raw, dict) or raw.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{where} is not a quickstep bundle manifest (format must be {BUNDLE_FORMAT!r})")
    version = raw.get("format_version")
    if version not in (1, BUNDLE_FORMAT_VERSION):
        raise BundleError(f"{where}: format_version {version!r} is not supported (this Quickstep reads bundle "
                          f"format versions 1 and {BUNDLE_FORMAT_VERSION}); re-export the bundle or upgrade Quickstep")
    out = dict(raw)
    if version == 1:
        out["teacher"] = _migrate_teacher(out.get("teacher"))
        quality = out.get("quality")
        if isinstance(quality, dict) and isinstance(quality.get("teacher"), dict):
            row = dict(quality["teacher"])
            if isinstance(row.get("checkpoint"), str) and _is_absolute(row["checkpoint"]):
                row.pop("checkpoint")
            out["quality"] = {**quality, "teacher": row}
        out["format_version"] = BUNDLE_FORMAT_VERSION
    return out


# ----------------------------------------------------------------------------------------------- reading
def _read_json(f: Path, error: type[ArtifactError] = ArtifactError) -> Any:
    if not f.is_file():
        raise error(f"{str(f)!r} does not exist")
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{f} is not valid JSON ({e}); the artefact is damaged") from e


def _problem(err: Any) -> str:
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "missing":
        return f"lacks the required key {loc!r}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def _validate(cls, data: Mapping[str, Any], where: str, error: type[ArtifactError] = ArtifactError):
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(_problem(err) for err in e.errors())
        raise error(f"{where} is malformed: {problems}") from None


__all__ = [
    "BUNDLE_FORMAT", "BUNDLE_FORMAT_VERSION", "CHECKPOINT_FORMAT", "CHECKPOINT_FORMAT_VERSION", "GENERATORS", "KINDS",
    "MANIFEST", "RUNNERS",
    "AotiSection", "ArtifactError", "BundleError", "DataSource", "ExternalData", "BundleManifest", "CheckpointMeta", "DataSpec", "FileEntry", "GraphEntry",
    "Parity", "ParityEntry", "Quality", "QualityEntry", "QualityFlag", "QualityTeacher", "QualityTolerance", "Runner",
    "TensorRTBuild", "SamplerSpec", "TeacherRef", "TensorSpec", "balanced_labels", "draw_labels",
    "draw_noise", "find_entry_point", "load_generators", "migrate_checkpoint", "migrate_manifest", "nfe", "open_runner", "plan_tag", "relative_ref", "sha256_file",
]
