"""Checkpoints: a directory with model.safetensors (EMA and raw weights), config.json and state.pt.

Saved atomically (written to DIR.tmp-*, fsynced, renamed over DIR); loaded without unpickling model
code (safetensors + JSON; state.pt with `weights_only=True`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from quickstep.artifacts import (
    CHECKPOINT_CONFIG,
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_VERSION,
    CHECKPOINT_WEIGHTS,
    ArtifactError,
    CheckpointMeta,
)

from .model import TrigFlowModel, build_model
from .networks import ModelConfig

FORMAT = CHECKPOINT_FORMAT
FORMAT_VERSION = CHECKPOINT_FORMAT_VERSION
WEIGHTS = CHECKPOINT_WEIGHTS
CONFIG = CHECKPOINT_CONFIG
STATE = "state.pt"
WEIGHT_SETS = ("ema", "raw")  # the two weight sets of a checkpoint (tensor-name prefixes in model.safetensors)


class CheckpointError(ValueError):
    """Base class of every checkpoint problem."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The directory or one of its required files does not exist."""


class CheckpointFormatError(CheckpointError):
    """A file is not what it claims to be (e.g. a pickle posing as safetensors, JSON that is not a config)."""


class CheckpointCorruptError(CheckpointError):
    """A file is truncated or its contents are damaged."""


class CheckpointMismatchError(CheckpointError):
    """The weights do not fit the model the config describes (missing/unexpected keys, wrong shapes)."""


# ----------------------------------------------------------------------------------------------- writing
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_dir(dest: str | Path, write_fn) -> Path:
    """Create `dest` atomically: `write_fn(tmpdir)` fills a sibling temporary directory, every file is fsynced,
    then it is renamed into place.  An existing `dest` is replaced; a crash leaves either the old or the new one
    (a stale DEST.old is recovered by `resolve_dir`)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a checkpoint/bundle is readable like any other directory
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
                _fsync_file(f)
            elif f.is_dir():
                os.chmod(f, 0o777 & ~umask)
        _fsync_dir(tmp)
        old = dest.with_name(dest.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if dest.exists():
            os.rename(dest, old)
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


CKPT_PREFIX = "step-"  # the trainer names checkpoints step-0001000 inside a run directory


def find_checkpoint(path: str | Path) -> Path:
    """`path` if it is a checkpoint directory, else the latest `step-*` checkpoint inside a run directory."""
    path = Path(path)
    if (path / CONFIG).exists() and (path / WEIGHTS).exists():
        return path
    if path.is_dir():
        cands = sorted((p for p in path.iterdir() if re.fullmatch(rf"{CKPT_PREFIX}\d+", p.name) and
                        (p / CONFIG).exists()), key=lambda p: int(p.name[len(CKPT_PREFIX):]))
        if cands:
            return cands[-1]
        raise CheckpointNotFoundError(f"{str(path)!r} holds no checkpoint (config.json or {CKPT_PREFIX}* dirs)")
    return resolve_dir(path)


def resolve_dir(path: str | Path) -> Path:
    """The checkpoint directory to read: `path`, or its `.old` twin if a save was interrupted mid-rename."""
    path = Path(path)
    if not path.exists():
        old = path.with_name(path.name + ".old")
        if old.exists():
            return old
        raise CheckpointNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise CheckpointFormatError(f"{str(path)!r} is a file; a checkpoint is a directory with {WEIGHTS} and {CONFIG}")
    return path


def save_checkpoint(
    path: str | Path,
    model: TrigFlowModel,
    *,
    ema: TrigFlowModel | None = None,
    extra_config: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically.  config.json is a `quickstep.artifacts.CheckpointMeta`: the model
    config plus `extra_config` (kind, sampler, training config, data, metrics, git revision, ...; a model saved
    without a `kind` is a diffusion model: a TrigFlow denoiser); `state` (optimizer, step, RNG states: tensors and
    plain containers only) goes to state.pt."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, m in (("ema.", ema if ema is not None else model), ("raw.", model)):
        for k, v in m.state_dict().items():
            tensors[prefix + k] = v.detach().to("cpu").contiguous().clone()
    raw = {"kind": "diffusion", **(extra_config or {}), "format": FORMAT, "format_version": FORMAT_VERSION,
           "model": model.config.to_dict()}
    try:
        meta = CheckpointMeta.from_json(json.loads(json.dumps(raw, default=str)))
    except ArtifactError as e:
        raise CheckpointFormatError(f"cannot save checkpoint {str(path)!r}: {e}") from e
    config = meta.to_json()

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if state is not None:
            torch.save(state, tmp / STATE)

    return atomic_write_dir(path, write)


# ----------------------------------------------------------------------------------------------- sampling times
TIMES_KEY = "consistency_times"  # format 1's config.json key; now CheckpointMeta.sampler.times


def recorded_times(config: dict[str, Any] | CheckpointMeta) -> dict[int, list[float]]:
    """The consistency sampler's times a checkpoint (or bundle) config records, {steps: [t_0 > t_1 > ...]}; {} if
    none.  A malformed entry is a CheckpointFormatError naming the problem."""
    try:
        meta = config if isinstance(config, CheckpointMeta) else CheckpointMeta.from_json(config)
    except ArtifactError as e:
        raise CheckpointFormatError(str(e)) from e
    if meta.sampler.name != "consistency":
        return {}
    return {int(k): [float(t) for t in v] for k, v in meta.sampler.times.items()}


def record_times(path: str | Path, times: dict[int, list[float]]) -> dict[str, Any]:
    """Record (merge) the consistency sampler's times into a checkpoint's config.json (atomic replace of that one
    file; the weights are untouched).  Returns the new config."""
    path = resolve_dir(path)
    meta = load_meta(path)
    merged = {str(k): [float(t) for t in v] for k, v in {**recorded_times(meta), **times}.items()}
    try:
        new = CheckpointMeta.from_json({**meta.to_json(), "sampler": {**meta.sampler.to_json(), "times": merged}})
    except ArtifactError as e:
        raise CheckpointFormatError(str(e)) from e
    tmp = path / f".{CONFIG}.tmp"
    tmp.write_text(json.dumps(new.to_json(), indent=2, sort_keys=True, default=str))
    _fsync_file(tmp)
    os.replace(tmp, path / CONFIG)
    _fsync_dir(path)
    return new.to_json()


# ----------------------------------------------------------------------------------------------- reading
def load_meta(path: str | Path) -> CheckpointMeta:
    """config.json of a checkpoint (or bundle) directory as a `CheckpointMeta` (older formats migrated)."""
    path = resolve_dir(path)
    f = path / CONFIG
    if not f.exists():
        raise CheckpointNotFoundError(f"{str(path)!r} has no {CONFIG}; is it a Quickstep checkpoint?")
    try:
        raw = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointCorruptError(f"{f} is not valid JSON ({e}); the checkpoint is damaged") from e
    if not isinstance(raw, dict) or "model" not in raw:
        raise CheckpointFormatError(f"{f} has no 'model' section; not a Quickstep checkpoint config")
    try:
        return CheckpointMeta.from_json(raw, str(f))
    except ArtifactError as e:
        raise CheckpointFormatError(str(e)) from e


def load_config(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint (or bundle) directory as a plain dict (current format; see `load_meta`)."""
    return load_meta(path).to_json()


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors (never unpickles)."""
    path = resolve_dir(path)
    f = path / WEIGHTS
    if not f.exists():
        raise CheckpointNotFoundError(f"{str(path)!r} has no {WEIGHTS}")
    with open(f, "rb") as fh:
        head = fh.read(16)
    if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or head[:4] == b"PK\x03\x04":
        raise CheckpointFormatError(f"{f} is a pickle/zip (torch.save) file, not safetensors; refusing to unpickle it")
    try:
        return load_file(str(f))
    except SafetensorError as e:
        msg = str(e)
        if any(w in msg.lower() for w in ("incomplete", "too small", "invalid", "eof", "out of bounds", "metadata")):
            raise CheckpointCorruptError(f"{f} is truncated or damaged: {msg}") from e
        raise CheckpointFormatError(f"{f} is not a valid safetensors file: {msg}") from e
    except Exception as e:  # noqa: BLE001 - any parse failure of an untrusted file is a format error
        raise CheckpointCorruptError(f"{f} could not be read as safetensors: {e}") from e


def load_model(path: str | Path, *, which: str = "ema", map_location: str | torch.device = "cpu") -> TrigFlowModel:
    """Rebuild a TrigFlowModel from a checkpoint or bundle directory: config.json + model.safetensors.
    `which` = 'ema' (default) or 'raw'."""
    if which not in WEIGHT_SETS:
        raise ValueError(f"which must be 'ema' or 'raw', got {which!r}")
    meta = load_meta(path)
    try:
        model_cfg = ModelConfig.from_dict(meta.model)
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointFormatError(f"config.json 'model' section is invalid: {e}") from e
    model = build_model(model_cfg)
    tensors = load_weights(path)
    prefix = which + "."
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not sd and which == "ema":
        sd = {k[4:]: v for k, v in tensors.items() if k.startswith("raw.")}
    if not sd:
        raise CheckpointMismatchError(f"{WEIGHTS} holds no '{which}.*' tensors")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
             if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"wrong shapes {wrong[:5]}")
        raise CheckpointMismatchError(f"weights in {path} do not fit the configured model: " + "; ".join(parts))
    model.load_state_dict(sd)
    return model.to(map_location).eval()


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """state.pt (optimizer, step, RNG states) loaded with weights_only=True: no code is ever unpickled."""
    path = resolve_dir(path)
    f = path / STATE
    if not f.exists():
        raise CheckpointNotFoundError(f"{str(path)!r} has no {STATE}; it cannot be resumed")
    try:
        return torch.load(f, map_location=map_location, weights_only=True)
    except __import__("pickle").UnpicklingError as e:
        raise CheckpointFormatError(f"{f} holds objects that are not plain tensors/containers; refusing to load: {e}") from e
    except (RuntimeError, EOFError) as e:
        raise CheckpointCorruptError(f"{f} is truncated or damaged: {e}") from e
