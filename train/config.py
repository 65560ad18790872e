"""The training configuration: one frozen, typed `TrainConfig` built at the CLI edge from a TOML preset plus
`--set key=value` overrides, and saved as JSON in every checkpoint's config.json (key "train").

The sections are pydantic models (frozen, unknown keys forbidden).  Choices are `Literal` types, `model.backbone` is
the table of `model.kind`'s backbone (`MLPBackbone` | `UNetBackbone`), and `objectives` maps each objective's name to
its config dataclass (the registry in `quickstep.train.losses`).  Every invalid key or value raises `ConfigError`
naming the key, the bad value and the valid keys or values; pydantic's own error never reaches the user."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import tomllib
import types
import typing
from importlib import resources
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from .core.networks import MLPConfig, ModelConfig, UNetConfig


class ConfigError(ValueError):
    """A preset, key or value is not valid; the message lists what is."""


# ----------------------------------------------------------------------------------------------- value types
def _integral(value: Any) -> Any:
    """TOML and JSON may write a count as a float (1e5): an integral float is that int."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# values are taken as TOML typed them: no "yes" -> true or "3" -> 3 (an int is a valid float)
Int = Annotated[int, BeforeValidator(_integral), Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Count = Annotated[Int, Field(ge=1)]
OnOff = Literal["auto", "on", "off"]  # "auto": on where it helps (CUDA)


def _device(value: str) -> str:
    if value in ("auto", "cpu", "cuda") or value.startswith("cuda:") and value[5:].isdigit():
        return value
    raise ConfigError(f"device = {value!r} is not valid; valid values: auto, cpu, cuda, cuda:N")


Device = Annotated[Str, AfterValidator(_device)]


class Section(BaseModel):
    """A config table: frozen, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------------------- sections
class DataConfig(Section):
    """Which data set (see quickstep.train.data.load_dataset) and its options."""

    name: Str = "gmm"
    path: Str | None = None
    resolution: Int | None = None
    split: Literal["train", "test", "all"] = "train"
    options: dict[str, Any] = Field(default_factory=dict)
    crop: Literal["none", "center"] = "none"  # "center": crop to a centered square before resizing to `resolution`
    xflip: Bool = False  # EDM's x-flip: every image also mirrored (2N indices per epoch); only where label-safe
    workers: Int = 2  # DataLoader worker processes for streamed sources (edm, tar); 0 = decode in the trainer
    prefetch: Count = 2  # batches each worker prepares ahead

    @field_validator("workers")
    @classmethod
    def _workers(cls, n: int) -> int:
        if n < 0:
            raise ConfigError(f"data.workers must be >= 0 (0 = decode in the training process), got {n}")
        return n


# The t-embedding sees t * time_scale.  sCM trains on dF/dt (sCT, sCD; a teacher is distilled through its dF/dt), and
# the core default 1000 gives frequencies up to ~1.6k rad that make the tangent explode: measured, a time_scale-1000
# teacher distils badly (gmm2d sCD 400 steps: 1-step sliced W2 0.26 vs 0.06-0.09 with 1-10; digits sCD 1-step FD 172
# vs 26 from a time_scale-10 teacher).  Every preset that builds its own network uses 10, so 10 is the default here.
TIME_SCALE = 10.0


class MLPBackbone(Section):
    """`MLPConfig` (train/core/networks.py) less what the data decides (dim, num_classes)."""

    kind: Literal["mlp"] = Field(default="mlp", exclude=True)  # = model.kind (not a key of the table)
    hidden: Int = 128
    depth: Int = 3
    dropout: Float = 0.0
    emb_channels: Int = 64
    time_scale: Float = TIME_SCALE


class UNetBackbone(Section):
    """`UNetConfig` (train/core/networks.py) less what the data decides (img_channels, img_resolution, num_classes)."""

    kind: Literal["unet"] = Field(default="unet", exclude=True)  # = model.kind (not a key of the table)
    model_channels: Int = 32
    channel_mult: tuple[Int, ...] = (1, 2)
    num_blocks: Int = 1
    attn_resolutions: tuple[Int, ...] = (8,)
    num_heads: Int = 1
    dropout: Float = 0.0
    emb_channels: Int | None = None  # None: 4 * model_channels
    time_scale: Float = TIME_SCALE


BACKBONES: dict[str, type[MLPBackbone] | type[UNetBackbone]] = {"mlp": MLPBackbone, "unet": UNetBackbone}
CORE_BACKBONES = {"mlp": MLPConfig, "unet": UNetConfig}
DATA_DERIVED = {"mlp": ("dim", "num_classes"), "unet": ("img_channels", "img_resolution", "num_classes")}


class ModelSection(Section):
    """The network: backbone kind and its hyper-parameters; data-derived sizes are filled in from the data."""

    kind: Literal["mlp", "unet"] = "mlp"
    # the data std the TrigFlow preconditioning assumes; "auto" = measured from the training data at the start of
    # fit (saved with the checkpoint like any other value)
    sigma_data: float | Literal["auto"] = 0.5
    logvar_channels: Int = 64  # 0 disables adaptive weighting
    conditional: Bool = True  # use class labels when the data has them
    backbone: Annotated[MLPBackbone | UNetBackbone, Field(discriminator="kind")] = Field(default_factory=MLPBackbone)

    @model_validator(mode="before")
    @classmethod
    def _backbone_of_kind(cls, data: Any) -> Any:
        """The backbone table is read as the backbone of `model.kind`."""
        if not isinstance(data, dict) or not isinstance(data.get("backbone", {}), dict):
            return data
        table = dict(data.get("backbone", {}))
        kind = data.get("kind", "mlp")
        if "kind" in table:
            valid = [k for k in BACKBONES.get(kind, MLPBackbone).model_fields if k != "kind"]
            raise _unknown_key("kind", valid, "model.backbone")
        return {**data, "backbone": {**table, "kind": kind}}

    @field_validator("sigma_data", mode="before")
    @classmethod
    def _sigma_data(cls, v: Any) -> Any:
        if v == "auto" or isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return v
        raise ConfigError(f'model.sigma_data must be a positive number or "auto", got {v!r}')


class OptimConfig(Section):
    name: Literal["adam", "adamw", "radam"] = "adam"
    fused: OnOff = "auto"  # fused Adam/AdamW kernels (RAdam has none: foreach)
    lr: Float = 1e-3
    betas: tuple[Float, Float] = (0.9, 0.999)
    eps: Float = 1e-8
    weight_decay: Float = 0.0
    warmup_steps: Int = 0  # linear LR warm-up
    # LR decay after the warm-up: "constant"; "cosine" / "linear" to final_lr_ratio * lr at the last step;
    # "inverse_sqrt" (EDM2, sCM): lr / sqrt(max(step / decay_ref_steps, 1))
    decay: Literal["constant", "cosine", "linear", "inverse_sqrt"] = "constant"
    final_lr_ratio: Float = Field(default=0.0, ge=0.0, le=1.0)
    decay_ref_steps: Count = 1000
    grad_clip: Float = 0.0  # max global gradient norm; 0 = off


class EMAConfig(Section):
    """EDM EMA: half-life in thousands of images, optional ramp-up (half-life <= rampup_ratio * images seen)."""

    halflife_kimg: Float = 500.0
    rampup_ratio: Float | None = 0.05


class LogConfig(Section):
    every: Count = 100  # JSONL / TensorBoard / progress-bar interval (steps)
    ckpt_every: Count = 1000  # checkpoint interval (steps); one is always written at the end
    keep_checkpoints: Int = 3  # 0 keeps all
    sample_every: Int = 0  # PNG sample grid interval (steps); 0 = only at the end
    sample_n: Int = 64
    sample_steps: Int = 18  # Heun steps of the sample grid
    tensorboard: Bool = True
    progress: Bool = True
    samples: Bool = True
    # exact consistency-map error E||f - Phi*||^2 per sigma band (consistency students on gmm data), logged at every
    # log interval for the raw weights and the EMA; noisy points per band (0 = off)
    map_error_n: Int = 256


class TrainConfig(Section):
    """The root configuration of a training run."""

    name: Str = "custom"
    seed: Int = 0
    steps: Count = 1000
    batch_size: Count = 256  # global (split evenly over DDP ranks)
    device: Device = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    amp: Literal["auto", "bf16", "none"] = "auto"  # "auto": bf16 on CUDA
    tf32: Bool = True  # CUDA: TF32 matmuls and convolutions for what runs in float32 (JVP, tangent, losses)
    channels_last: OnOff = "auto"  # UNet activations NHWC
    compile: Bool = False  # torch.compile the backbone (the exact JVP and FP's double backward run it eagerly)
    max_seconds: Float = 0.0  # > 0: the step that ends past this wall time is the last (logged, checkpointed)
    init_from: Str | None = None  # checkpoint whose EMA weights initialise the model (and its architecture)
    # consistency students: the 2-step sampler's intermediate time (radians) recorded in every checkpoint
    # (config.json "consistency_times"; export and serving use it).  None: the core default T_MID = 1.1.
    t_mid: Float | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    objectives: dict[str, Any] = Field(default_factory=dict)  # name -> that objective's config dataclass

    @field_validator("objectives", mode="before")
    @classmethod
    def _objective_configs(cls, raw: Any) -> dict[str, Any]:
        return objective_configs(raw)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if not self.objectives:
            from .losses import OBJECTIVES

            raise ConfigError(f"no objective configured; add one of: {', '.join(sorted(OBJECTIVES))}")
        if "stf" in self.objectives and "diffusion" in self.objectives:
            raise ConfigError("objectives 'stf' and 'diffusion' are exclusive: stf IS the diffusion term with the "
                              "STF target; remove objectives.diffusion (--set objectives.diffusion=none)")
        if self.data.xflip and self.data.name == "gmm":
            raise ConfigError("data.xflip mirrors images; the gmm mixtures are vectors (set data.xflip=false)")
        if self.t_mid is not None and not 0.0 < self.t_mid < 1.56:
            raise ConfigError(f"t_mid must be a time in radians in (0, 1.56) (sigma = sigma_d tan t_mid), "
                              f"got {self.t_mid}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (round-trips through `TrainConfig.from_dict`)."""
        d = self.model_dump(exclude={"objectives"})
        d["objectives"] = {k: dataclasses.asdict(v) for k, v in self.objectives.items()}
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TrainConfig:
        """A saved config (`to_dict`, a checkpoint's config.json "train"); `ConfigError` on any unknown key or bad
        value.  Versions before the typed backbone saved only the backbone keys a preset set: a missing one meant the
        core default of `MLPConfig` / `UNetConfig` (time_scale 1000), and reads so here."""
        return build_config(_saved_backbone_defaults(d))


def _saved_backbone_defaults(d: Any) -> Any:
    """`d` with the backbone keys it lacks taken from the core backbone config of its kind."""
    model = d.get("model", {}) if isinstance(d, dict) else None
    kind = model.get("kind", "mlp") if isinstance(model, dict) else None
    if kind not in BACKBONES or not isinstance(model.get("backbone", {}), dict):
        return d  # validation names the problem
    core = {f.name: f.default for f in dataclasses.fields(CORE_BACKBONES[kind]) if f.init}
    saved = {k: core[k] for k in _keys(BACKBONES[kind])} | model.get("backbone", {})
    return {**d, "model": {**model, "backbone": saved}}


# ----------------------------------------------------------------------------------------------- objectives
def _strict(tp: Any) -> Any:
    """A dataclass field's type with the config's TOML-typed scalars (X | None keeps its None)."""
    scalars = {int: Int, float: Float, bool: Bool, str: Str}
    args = typing.get_args(tp)
    if args and type(None) in args:
        return _strict(next(a for a in args if a is not type(None))) | None
    return scalars.get(tp, tp)


@functools.cache
def objective_options(config_cls: type) -> type[Section]:
    """The pydantic model of an objective's config dataclass: its fields, types and defaults; unknown keys forbidden.
    (The dataclass itself still checks the values it constrains, in __post_init__ or the objective's constructor.)"""
    hints = typing.get_type_hints(config_cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if f.init:
            default = (Field(default_factory=f.default_factory) if f.default_factory is not dataclasses.MISSING
                       else f.default)
            fields[f.name] = (_strict(hints[f.name]), default)
    return create_model(f"{config_cls.__name__}Options", __base__=Section, **fields)


def objective_configs(raw: Any) -> dict[str, Any]:
    """`objectives` name -> table (a preset's [objectives.<name>]) validated into name -> config dataclass."""
    from .losses import OBJECTIVES  # the registry (imports every objective module)

    if not isinstance(raw, dict):
        raise ConfigError("objectives must be a table of [objectives.<name>] tables")
    configs = {}
    for name, table in raw.items():
        if name not in OBJECTIVES:
            raise _unknown_key(name, sorted(OBJECTIVES), "objectives")
        spec = OBJECTIVES[name]
        if isinstance(table, spec.config_cls):
            table = dataclasses.asdict(table)
        table = {} if table is True else table
        if not isinstance(table, dict):
            raise ConfigError(f"objectives.{name} must be a table of {spec.config_cls.__name__} fields")
        options = validate(objective_options(spec.config_cls), table, f"objectives.{name}")
        try:  # objectives validate their own values at construction
            configs[name] = spec.config_cls(**dict(options))
            spec.factory(configs[name])
        except (ValueError, TypeError) as e:
            raise ConfigError(f"objectives.{name}: {e}") from e
    return configs


# ----------------------------------------------------------------------------------------------- errors
def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ConfigError(f"unknown key {where + '.' if where else ''}{key}{hint}; valid keys: {', '.join(valid)}")


def _keys(section: Any) -> list[str]:
    return [k for k, f in section.model_fields.items() if not f.exclude]


def _locate(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Any, list[str], Any]:
    """Walk an error location from `root`: (the section holding the last key, the dotted key path, its field)."""
    section: Any = root
    path: list[str] = []
    field = None
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            break  # inside a leaf value (a tuple index, an options key)
        path.append(str(part))
        field = section.model_fields.get(part)
        if field is None:
            break  # an unknown key of `section`
        tp = field.annotation
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and parts and parts[0] in BACKBONES:
            section = BACKBONES[parts.pop(0)]  # the tag of the backbone union
        else:
            section = tp
    return section if field is None else None, path, field


def _choices(tp: Any) -> list[str]:
    """The values of the Literal(s) in a field type."""
    if typing.get_origin(tp) is Literal:
        return [str(a) for a in typing.get_args(tp)]
    return [c for a in typing.get_args(tp) for c in _choices(a)]


PHRASES = {
    "int_type": "must be an integer", "int_from_float": "must be an integer", "int_parsing": "must be an integer",
    "float_type": "must be a number", "float_parsing": "must be a number", "bool_type": "must be true or false",
    "string_type": "must be a string", "tuple_type": "must be a list", "list_type": "must be a list",
}


def describe(error: ValidationError, root: type[BaseModel], where: str = "") -> str:
    """One line for the first problem pydantic found: the key, the bad value and what is valid."""
    err = error.errors(include_url=False)[0]
    ctx = err.get("ctx") or {}
    if isinstance(ctx.get("error"), ConfigError):  # one of this module's own checks: its message is complete
        return str(ctx["error"])
    owner, path, field = _locate(root, err["loc"])
    key = ".".join([where, *path] if where else path)
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden" and owner is not None:
        return str(_unknown_key(path[-1], _keys(owner), ".".join([where, *path[:-1]] if where else path[:-1])))
    if kind == "literal_error" and field is not None:
        return f"{key} = {value!r} is not valid; valid values: {', '.join(_choices(field.annotation))}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        tp = field.annotation if field is not None else None
        keys = f" of {', '.join(_keys(tp))}" if isinstance(tp, type) and issubclass(tp, BaseModel) else ""
        return f"{key} must be a table{keys}, got {value!r}"
    if kind in ("too_long", "too_short", "missing"):  # every key has a default: "missing" is a tuple element
        args = typing.get_args(field.annotation) if field is not None else ()
        return f"{key} must have {len(args)} elements, got {value!r}"
    for bound, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx:
            return f"{key} must be {op} {ctx[bound]}, got {value!r}"
    return f"{key} {PHRASES.get(kind, 'is not valid (' + err['msg'] + ')')}, got {value!r}"


def validate(model: type[Section], d: Any, where: str = "") -> Any:
    """`model` validated from `d`; a `ConfigError` describing the first problem otherwise."""
    try:
        return model.model_validate(d)
    except ValidationError as e:
        raise ConfigError(describe(e, model, where)) from None


# ----------------------------------------------------------------------------------------------- building
def build_config(d: dict[str, Any]) -> TrainConfig:
    """A validated TrainConfig from a plain dict (a preset's TOML + overrides, or `to_dict()`)."""
    if not isinstance(d, dict):
        raise ConfigError("a training config must be a table")
    return validate(TrainConfig, d)


def model_config(cfg: TrainConfig, spec: Any, data_std: float | None = None) -> ModelConfig:
    """The ModelConfig of the run: the [model] section plus sizes and classes taken from the data spec;
    `model.sigma_data = "auto"` takes `data_std` (the measured std of the training data)."""
    m = cfg.model
    sigma_data = m.sigma_data
    if sigma_data == "auto":
        if data_std is None:
            raise ConfigError('model.sigma_data = "auto" needs the data: its std is measured at the start of fit')
        sigma_data = round(float(data_std), 6)
    nc = spec.num_classes if m.conditional else 0
    b = m.backbone.model_dump()
    if m.kind == "mlp":
        if spec.kind != "vector":
            raise ConfigError(f"model.kind 'mlp' needs vector data, but {spec.name!r} is {spec.kind} data; "
                              "use a preset with model.kind = 'unet'")
        backbone: MLPConfig | UNetConfig = MLPConfig(dim=spec.shape[0], num_classes=nc, **b)
    else:
        if spec.kind != "image":
            raise ConfigError(f"model.kind 'unet' needs image data, but {spec.name!r} is {spec.kind} data; "
                              "use a preset with model.kind = 'mlp'")
        backbone = UNetConfig(img_channels=spec.shape[0], img_resolution=spec.shape[1], num_classes=nc, **b)
    return ModelConfig(backbone=backbone, sigma_data=float(sigma_data), logvar_channels=m.logvar_channels)


# ----------------------------------------------------------------------------------------------- presets
def list_presets() -> list[str]:
    """Names of the TOML presets shipped in quickstep.train.configs."""
    root = resources.files("quickstep.train.configs")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def preset_dict(name: str) -> dict[str, Any]:
    """The raw dict of preset `name`."""
    names = list_presets()
    if name not in names:
        near = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; valid presets: {', '.join(names)}")
    text = (resources.files("quickstep.train.configs") / f"{name}.toml").read_text()
    return tomllib.loads(text)


def parse_value(text: str) -> Any:
    """A --set value: a TOML literal (1e-3, true, [1, 2], "s", {a = 1}); 'none'/'null' mean None; else a string."""
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(d: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides to a raw config dict (a copy).  `objectives.NAME=none` removes an
    objective; setting a key of an absent objective adds it with defaults for the rest."""
    d = copy.deepcopy(d)
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. optim.lr=2e-4), got {item!r}")
        key, text = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set has an empty key in {item!r}")
        value = parse_value(text.strip())
        node = d
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {p!r} is a value, not a table")
            node = nxt
        if value is None and (len(parts) == 2 and parts[0] == "objectives"):
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return d


def load_preset(name: str, sets: list[str] | None = None, *, data_path: str | None = None) -> TrainConfig:
    """Preset + overrides (+ `--data PATH` replaces the preset's data: an .npz, an EDM zip or folder, .tar shards, a
    CIFAR-10 batch folder, an image folder or a set prepared by `quickstep-train data`, see data.detect_source).
    The preset's resolution, crop, x-flip and loader settings stay; a prepared set keeps its own resolution."""
    from .data import detect_source

    d = preset_dict(name)
    d.setdefault("name", name)
    if data_path is not None:
        old = d.get("data", {})
        kind = detect_source(data_path)
        d["data"] = {"name": kind, "path": str(data_path),
                     "resolution": None if kind == "prepared" else old.get("resolution"),
                     **{k: old[k] for k in ("crop", "xflip", "workers", "prefetch") if k in old}}
    return build_config(apply_overrides(d, sets or []))
