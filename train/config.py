"""The training configuration: one frozen, typed `TrainConfig` built at the CLI edge from a TOML preset plus
`--set key=value` overrides, validated field by field (unknown keys and bad values raise `ConfigError`
naming the valid ones), and saved as JSON in every checkpoint's config.json (key "train")."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from .core.networks import MLPConfig, ModelConfig, UNetConfig


class ConfigError(ValueError):
    """A preset, key or value is not valid; the message lists what is."""


# ----------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DataConfig:
    """Which data set (see quickstep.train.data.load_dataset) and its options."""

    name: str = "gmm"
    path: str | None = None
    resolution: int | None = None
    split: str = "train"
    options: dict[str, Any] = field(default_factory=dict)
    crop: str = "none"  # "center": crop images to a centered square before resizing to `resolution`
    xflip: bool = False  # EDM's x-flip: every image also mirrored (2N indices per epoch); only where label-safe
    workers: int = 2  # DataLoader worker processes for streamed sources (edm, tar); 0 = decode in the trainer
    prefetch: int = 2  # batches each worker prepares ahead


@dataclass(frozen=True)
class ModelSection:
    """The network: backbone kind and its hyper-parameters; data-derived sizes are filled in from the data."""

    kind: str = "mlp"  # "mlp" | "unet"
    # the data std the TrigFlow preconditioning assumes; "auto" = measured from the training data at the start of
    # fit (saved with the checkpoint like any other value)
    sigma_data: float | str = 0.5
    logvar_channels: int = 64  # 0 disables adaptive weighting
    conditional: bool = True  # use class labels when the data has them
    backbone: dict[str, Any] = field(default_factory=dict)  # fields of MLPConfig / UNetConfig


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adam"  # "adam" | "adamw" | "radam"
    fused: str = "auto"  # fused Adam/AdamW kernels: "auto" (on CUDA) | "on" | "off" (RAdam has none: foreach)
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear LR warm-up
    grad_clip: float = 0.0  # max global gradient norm; 0 = off


@dataclass(frozen=True)
class EMAConfig:
    """EDM EMA: half-life in thousands of images, optional ramp-up (half-life <= rampup_ratio * images seen)."""

    halflife_kimg: float = 500.0
    rampup_ratio: float | None = 0.05


@dataclass(frozen=True)
class LogConfig:
    every: int = 100  # JSONL / TensorBoard / progress-bar interval (steps)
    ckpt_every: int = 1000  # checkpoint interval (steps); one is always written at the end
    keep_checkpoints: int = 3  # 0 keeps all
    sample_every: int = 0  # PNG sample grid interval (steps); 0 = only at the end
    sample_n: int = 64
    sample_steps: int = 18  # Heun steps of the sample grid
    tensorboard: bool = True
    progress: bool = True
    samples: bool = True
    # exact consistency-map error E||f - Phi*||^2 per sigma band (consistency students on gmm data), logged at every
    # log interval for the raw weights and the EMA; noisy points per band (0 = off)
    map_error_n: int = 256


@dataclass(frozen=True)
class TrainConfig:
    """The root configuration of a training run."""

    name: str = "custom"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 256  # global (split evenly over DDP ranks)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    amp: str = "auto"  # "auto" (bf16 on CUDA) | "bf16" | "none"
    tf32: bool = True  # CUDA: TF32 matmuls and convolutions for what runs in float32 (JVP, tangent, losses)
    channels_last: str = "auto"  # UNet activations NHWC: "auto" (on CUDA) | "on" | "off"
    compile: bool = False  # torch.compile the backbone (the exact JVP and FP's double backward run it eagerly)
    max_seconds: float = 0.0  # > 0: the step that ends past this wall time is the last (logged, checkpointed)
    init_from: str | None = None  # checkpoint whose EMA weights initialise the model (and its architecture)
    # consistency students: the 2-step sampler's intermediate time (radians) recorded in every checkpoint
    # (config.json "consistency_times"; export and serving use it).  None: the core default T_MID = 1.1.
    t_mid: float | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    log: LogConfig = field(default_factory=LogConfig)
    objectives: dict[str, Any] = field(default_factory=dict)  # name -> that objective's config dataclass

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (round-trips through `TrainConfig.from_dict`)."""
        d = dataclasses.asdict(self)
        d["objectives"] = {k: dataclasses.asdict(v) for k, v in self.objectives.items()}
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TrainConfig:
        """Validate and build from a (TOML/JSON) dict; `ConfigError` on any unknown key or bad value."""
        return build_config(d)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.kind": ("mlp", "unet"),
    "optim.name": ("adam", "adamw", "radam"),
    "optim.fused": ("auto", "on", "off"),
    "amp": ("auto", "bf16", "none"),
    "channels_last": ("auto", "on", "off"),
    "data.split": ("train", "test", "all"),
    "data.crop": ("none", "center"),
}
DATA_DERIVED = {"mlp": ("dim", "num_classes"), "unet": ("img_channels", "img_resolution", "num_classes")}


# ----------------------------------------------------------------------------------------------- building
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value against a type hint."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table of {', '.join(f.name for f in dataclasses.fields(tp))}")
        return _build(tp, value, where)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return dict(value)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where} must have {len(args)} elements, got {list(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ConfigError(f"unknown key {where + '.' if where else ''}{key}{hint}; valid keys: {', '.join(valid)}")


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for k, v in d.items():
        if k not in names:
            raise _unknown_key(k, names, where)
        if where == "" and k == "objectives":
            continue
        key = f"{where}.{k}" if where else k
        kwargs[k] = _coerce(v, hints[k], key)
        if key in CHOICES and kwargs[k] not in CHOICES[key]:
            raise ConfigError(f"{key} = {kwargs[k]!r} is not valid; valid values: {', '.join(CHOICES[key])}")
    return cls(**kwargs)


def build_config(d: dict[str, Any]) -> TrainConfig:
    """A validated TrainConfig from a plain dict (preset TOML + overrides, or a checkpoint's config.json)."""
    from .losses import OBJECTIVES  # the registry (imports every objective module)

    if not isinstance(d, dict):
        raise ConfigError("a training config must be a table")
    cfg = _build(TrainConfig, d, "")
    objectives = {}
    raw = d.get("objectives", {})
    if not isinstance(raw, dict):
        raise ConfigError("objectives must be a table of [objectives.<name>] tables")
    for name, table in raw.items():
        if name not in OBJECTIVES:
            raise _unknown_key(name, sorted(OBJECTIVES), "objectives")
        table = {} if table is True else table
        if not isinstance(table, dict):
            raise ConfigError(f"objectives.{name} must be a table of {OBJECTIVES[name].config_cls.__name__} fields")
        objectives[name] = _build(OBJECTIVES[name].config_cls, table, f"objectives.{name}")
        try:  # objectives validate their own values at construction
            OBJECTIVES[name].factory(objectives[name])
        except (ValueError, TypeError) as e:
            raise ConfigError(f"objectives.{name}: {e}") from e
    if not objectives:
        raise ConfigError(f"no objective configured; add one of: {', '.join(sorted(OBJECTIVES))}")
    if "stf" in objectives and "diffusion" in objectives:
        raise ConfigError("objectives 'stf' and 'diffusion' are exclusive: stf IS the diffusion term with the STF "
                          "target; remove objectives.diffusion (--set objectives.diffusion=none)")
    kind = cfg.model.kind
    allowed = [f.name for f in dataclasses.fields(MLPConfig if kind == "mlp" else UNetConfig)
               if f.init and f.name not in DATA_DERIVED[kind]]
    for k in cfg.model.backbone:
        if k not in allowed:
            raise _unknown_key(k, allowed, "model.backbone")
    for key, positive in (("steps", cfg.steps), ("batch_size", cfg.batch_size), ("log.every", cfg.log.every),
                          ("log.ckpt_every", cfg.log.ckpt_every), ("data.prefetch", cfg.data.prefetch)):
        if positive < 1:
            raise ConfigError(f"{key} must be >= 1, got {positive}")
    if cfg.data.workers < 0:
        raise ConfigError(f"data.workers must be >= 0 (0 = decode in the training process), got {cfg.data.workers}")
    if cfg.data.xflip and cfg.data.name == "gmm":
        raise ConfigError("data.xflip mirrors images; the gmm mixtures are vectors (set data.xflip=false)")
    sd = cfg.model.sigma_data
    if isinstance(sd, str) and sd != "auto" or not isinstance(sd, str) and not sd > 0:
        raise ConfigError(f'model.sigma_data must be a positive number or "auto", got {sd!r}')
    if cfg.t_mid is not None and not 0.0 < cfg.t_mid < 1.56:
        raise ConfigError(f"t_mid must be a time in radians in (0, 1.56) (sigma = sigma_d tan t_mid), got {cfg.t_mid}")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device = {cfg.device!r} is not valid; valid values: auto, cpu, cuda, cuda:N")
    return dataclasses.replace(cfg, objectives=objectives)


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
    b = dict(m.backbone)
    try:
        if m.kind == "mlp":
            if spec.kind != "vector":
                raise ConfigError(f"model.kind 'mlp' needs vector data, but {spec.name!r} is {spec.kind} data; "
                                  "use a preset with model.kind = 'unet'")
            backbone: MLPConfig | UNetConfig = MLPConfig(dim=spec.shape[0], num_classes=nc, **b)
        else:
            if spec.kind != "image":
                raise ConfigError(f"model.kind 'unet' needs image data, but {spec.name!r} is {spec.kind} data; "
                                  "use a preset with model.kind = 'mlp'")
            for k in ("channel_mult", "attn_resolutions"):
                if k in b:
                    b[k] = tuple(b[k])
            backbone = UNetConfig(img_channels=spec.shape[0], img_resolution=spec.shape[1], num_classes=nc, **b)
    except TypeError as e:
        raise ConfigError(f"model.backbone: {e}") from e
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
