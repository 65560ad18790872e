"""Checkpoints: a directory with model.safetensors (EMA and raw weights), config.json and state.pt.

Saved atomically (written to DIR.tmp-*, fsynced, renamed over DIR); loaded without unpickling model
code (safetensors + JSON; state.pt with `weights_only=True`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import TrigFlowModel, build_model
from .networks import ModelConfig

FORMAT = "quickstep-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "state.pt"


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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
    """Write a checkpoint directory atomically.  `extra_config` (training config, data, metrics, git revision, ...)
    is merged into config.json; `state` (optimizer, step, RNG states: tensors and plain containers only) goes to state.pt."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, m in (("ema.", ema if ema is not None else model), ("raw.", model)):
        for k, v in m.state_dict().items():
            tensors[prefix + k] = v.detach().to("cpu").contiguous().clone()
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict()}
    config.update(extra_config or {})

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if state is not None:
            torch.save(state, tmp / STATE)

    return atomic_write_dir(path, write)


# ----------------------------------------------------------------------------------------------- sampling times
TIMES_KEY = "consistency_times"  # config.json: {"1": [t_max], "2": [t_max, t_mid]} chosen for this model


def recorded_times(config: dict[str, Any]) -> dict[int, list[float]]:
    """The consistency sampler's times a checkpoint (or bundle) config records, {steps: [t_0 > t_1 > ...]}; {} if
    none.  A malformed entry is a CheckpointFormatError naming the problem."""
    raw = config.get(TIMES_KEY)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f"config.json '{TIMES_KEY}' must map step counts to time lists, got {raw!r}")
    out: dict[int, list[float]] = {}
    for k, v in raw.items():
        try:
            steps, ts = int(k), [float(t) for t in v]
        except (TypeError, ValueError):
            raise CheckpointFormatError(f"config.json '{TIMES_KEY}'[{k!r}] must be a list of numbers, got {v!r}") from None
        if steps < 1 or len(ts) != steps or any(not 0 < t < math.pi / 2 for t in ts) or any(
                b >= a for a, b in zip(ts[:-1], ts[1:], strict=False)):
            raise CheckpointFormatError(f"config.json '{TIMES_KEY}'[{k!r}] = {ts} must hold {k} decreasing times in "
                                        "(0, pi/2)")
        out[steps] = ts
    return out


def record_times(path: str | Path, times: dict[int, list[float]]) -> dict[str, Any]:
    """Record (merge) the consistency sampler's times into a checkpoint's config.json (atomic replace of that one
    file; the weights are untouched).  Returns the new config."""
    path = resolve_dir(path)
    cfg = load_config(path)
    merged = {str(k): [float(t) for t in v] for k, v in {**recorded_times(cfg), **times}.items()}
    new = {**cfg, TIMES_KEY: merged}
    recorded_times(new)  # validate before writing
    tmp = path / f".{CONFIG}.tmp"
    tmp.write_text(json.dumps(new, indent=2, sort_keys=True, default=str))
    _fsync_file(tmp)
    os.replace(tmp, path / CONFIG)
    _fsync_dir(path)
    return new


# ----------------------------------------------------------------------------------------------- reading
def load_config(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint (or bundle) directory, validated to describe a model."""
    path = resolve_dir(path)
    f = path / CONFIG
    if not f.exists():
        raise CheckpointNotFoundError(f"{str(path)!r} has no {CONFIG}; is it a Quickstep checkpoint?")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointCorruptError(f"{f} is not valid JSON ({e}); the checkpoint is damaged") from e
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise CheckpointFormatError(f"{f} has no 'model' section; not a Quickstep checkpoint config")
    return cfg


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
    if which not in ("ema", "raw"):
        raise ValueError(f"which must be 'ema' or 'raw', got {which!r}")
    cfg = load_config(path)
    try:
        model_cfg = ModelConfig.from_dict(cfg["model"])
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
