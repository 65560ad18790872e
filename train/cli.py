"""`quickstep-train`: fit a model from a TOML preset, sample from a checkpoint, list presets.

    quickstep-train fit --preset gmm2d-plain --out runs/gmm [--data x.npz] [--set optim.lr=2e-4 ...]
                        [--steps N] [--resume DIR] [--teacher DIR] [--dry-run]
                        (--resume of a distilled student reuses the teacher recorded in its config.json)
    quickstep-train sample --ckpt runs/gmm [--sampler heun|euler|sde|consistency] [--steps N] -n 64
                        [--class K] [--seed S] --out grid.png
                        (default: consistency sampler, 1 step, for consistency checkpoints; else heun, 18 steps)
    quickstep-train presets
    quickstep-train data SOURCE OUT [--kind folder|edm|tar|cifar10|npz] [--resolution R] [--crop center]
                        [--channels 1|3] [--split train] [--overwrite]   (decode once into the prepared format)
    quickstep-train data --verify OUT

Bad input (unknown preset, key or value, missing checkpoint) prints one clear line and exits with code 2; a
bad flag or choice is typer's usage error (exit 2, naming the valid values).  Other stages add sub-commands: a
module `quickstep.train.eval.cli` exposing `register(app)` is picked up automatically (it adds typer commands).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from quickstep.cli import run_app

PROG = "quickstep-train"
EXIT_USAGE = 2
SAMPLERS = ("heun", "euler", "sde", "consistency")
DEFAULT_STEPS = {"consistency": 1, "heun": 18, "euler": 18, "sde": 18}  # when --steps is not given


class UsageError(Exception):
    """Bad user input: printed as one line, exit code 2."""


def _fail(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


class _Group(typer.core.TyperGroup):
    """An unknown sub-command names the valid ones."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            ctx.fail(f"No such command {args[0]!r}; valid commands: {', '.join(sorted(self.commands))}")
        return super().resolve_command(ctx, args)


app = typer.Typer(name=PROG, cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Train TrigFlow diffusion teachers and consistency models.")


def _choices(name: str, values: Sequence[str]) -> type[StrEnum]:
    """A StrEnum of the allowed values of an option (typer names them in its error for any other value)."""
    return StrEnum(name, {v: v for v in values})


Sampler = _choices("Sampler", SAMPLERS)
Weights = _choices("Weights", ("ema", "raw"))
DataKind = _choices("DataKind", ("folder", "edm", "tar", "cifar10", "npz"))
Split = _choices("Split", ("train", "test", "all"))
Crop = _choices("Crop", ("none", "center"))
Channels = _choices("Channels", ("1", "3"))


# ----------------------------------------------------------------------------------------------- fit
@app.command(help="train from a preset (or resume a run)")
def fit(
    preset: str | None = typer.Option(None, "--preset", help="preset name (see `quickstep-train presets`)"),
    data: str | None = typer.Option(None, "--data", help="data replacing the preset's: a `quickstep-train data` "
                                    "output, an image folder, an EDM zip/folder, .tar shards, a CIFAR-10 batch "
                                    "folder or an .npz (same kind as the preset's)"),
    set_: list[str] | None = typer.Option(None, "--set", metavar="KEY=VALUE",
                                          help="override a config key (repeatable)"),
    out: str = typer.Option(..., "--out", help="run directory (checkpoints, logs, samples)"),
    steps: int | None = typer.Option(None, "--steps", help="total number of steps (overrides the preset)"),
    resume: str | None = typer.Option(None, "--resume", metavar="DIR",
                                      help="checkpoint or run directory to continue exactly"),
    teacher: str | None = typer.Option(None, "--teacher", metavar="DIR", help="frozen teacher checkpoint (EMA "
                                       "weights) for distillation, or gmm:<preset> for a Gaussian mixture's exact "
                                       "PF-ODE (e.g. gmm:ring8); --resume reuses the teacher recorded in the "
                                       "checkpoint when this is not given"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and model size; no training"),
) -> None:
    from .config import build_config, load_preset
    from .core.checkpoint import CheckpointError
    from .loop import NonFiniteLossError, Trainer, config_from_checkpoint, data_std

    if resume:
        if preset or data or set_:
            raise UsageError("--resume continues a run with its saved config; do not combine it with "
                             "--preset/--data/--set (only --steps may extend the run)")
        cfg = config_from_checkpoint(resume)
    else:
        if not preset:
            from .config import list_presets

            raise UsageError(f"--preset is required; valid presets: {', '.join(list_presets())}")
        cfg = load_preset(preset, set_ or [], data_path=data)
    if steps is not None:
        if steps < 1:
            raise UsageError(f"--steps must be >= 1, got {steps}")
        cfg = cfg.model_copy(update={"steps": steps})
    cfg = build_config(cfg.to_dict() if resume else _relative_paths(cfg.to_dict()))
    if dry_run:
        print(json.dumps(_resolved(cfg, data_std), indent=2, default=str))
        return
    try:
        trainer = Trainer(cfg, Path(out), resume=resume, teacher=teacher)
    except CheckpointError as e:
        raise UsageError(str(e)) from e
    try:
        result = trainer.fit()
    except NonFiniteLossError as e:
        print(f"{PROG}: training stopped: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
    finally:
        trainer.close()
    if trainer.rank == 0:
        print(f"trained {result.step} steps; last checkpoint: {result.checkpoint}")


def _relative_paths(d: dict[str, Any]) -> dict[str, Any]:
    """A config dict whose init_from and data.path are relative to the working directory, as the run records its
    teacher (artefacts never hold a path of the machine that made them); a relative path resolves as before."""
    from quickstep.artifacts import relative_ref

    def rel(path: str | None) -> str | None:
        return relative_ref(path) or path if path is not None and Path(path).is_absolute() else path

    return {**d, "init_from": rel(d.get("init_from")), "data": {**d["data"], "path": rel(d["data"].get("path"))}}


def _resolved(cfg, data_std) -> dict[str, Any]:
    """--dry-run: the resolved config, the data's spec and size, the model config and its parameter count."""
    from .config import model_config
    from .core.model import build_model
    from .data import load_dataset

    d = cfg.data
    ds = load_dataset(d.name, path=d.path, split=d.split, seed=cfg.seed, resolution=d.resolution, crop=d.crop,
                      stream=True, **dict(d.options))
    mc = model_config(cfg, ds.spec, data_std=data_std(ds))
    n_params = sum(p.numel() for p in build_model(mc).parameters())
    return {"train": cfg.to_dict(), "data": ds.spec.to_dict(), "num_samples": len(ds), "model": mc.to_dict(),
            "parameters": n_params}


# ----------------------------------------------------------------------------------------------- sample
@app.command(help="draw samples from a checkpoint into a PNG")
def sample(
    ckpt_dir: str = typer.Option(..., "--ckpt", help="checkpoint or run directory"),
    sampler_name: Sampler | None = typer.Option(None, "--sampler", help="default: consistency for a consistency "
                                                "checkpoint (sCT/sCD/Direct CM/CD), else heun"),
    steps: int | None = typer.Option(None, "--steps", help="default: 1 for the consistency sampler, else 18"),
    n: int = typer.Option(64, "-n"),
    class_label: int | None = typer.Option(None, "--class"),
    seed: int = typer.Option(0, "--seed"),
    weights: Weights = typer.Option("ema", "--weights"),
    device_name: str = typer.Option("auto", "--device"),
    out: str = typer.Option(..., "--out", help="PNG path"),
) -> None:
    import torch

    from .core import checkpoint as ckpt
    from .core.sampling import karras_sigmas, sample_consistency, sample_euler, sample_heun, sample_sde
    from .loop import find_checkpoint, save_samples_png

    if n < 1:
        raise UsageError(f"-n must be >= 1, got {n}")
    try:
        path = find_checkpoint(ckpt_dir)
        config = ckpt.load_meta(path)
        kind = config.kind
        times = ckpt.recorded_times(config)  # the checkpoint's own consistency times, when it records them
        sampler = sampler_name.value if sampler_name else ("consistency" if kind == "consistency" else "heun")
        steps = steps if steps is not None else DEFAULT_STEPS[sampler]
        if steps < 1:
            what = ("1 = one-step, 2 = two-step sCM sampling" if sampler == "consistency"
                    else "the number of noise levels of the Karras grid")
            raise UsageError(f"--steps must be >= 1 for the {sampler} sampler ({what}), got {steps}")
        model = ckpt.load_model(path, which=weights.value)
    except ckpt.CheckpointError as e:
        raise UsageError(str(e)) from e
    device = torch.device(device_name if device_name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    labels = None
    if model.num_classes > 0:
        if class_label is not None:
            if not 0 <= class_label < model.num_classes:
                raise UsageError(f"--class must be in [0, {model.num_classes - 1}], got {class_label}")
            labels = torch.full((n,), class_label, dtype=torch.long, device=device)
        else:
            labels = torch.arange(n, device=device) % model.num_classes
    elif class_label is not None:
        raise UsageError("--class given, but the model is unconditional")
    eps = torch.randn((n, *model.sample_shape), generator=g, device=device)
    with torch.no_grad():
        if sampler == "consistency":
            x = sample_consistency(model, model.sigma_data * eps, steps=steps, ts=times.get(steps), generator=g,
                                   class_labels=labels)
        else:
            sig = karras_sigmas(steps, device=device)
            if sampler == "heun":
                x = sample_heun(model.denoise, eps * sig[0], sig, class_labels=labels)
            elif sampler == "euler":
                x = sample_euler(model.denoise, eps * sig[0], sig, class_labels=labels)
            else:
                x = sample_sde(model.denoise, eps * sig[0], sig, class_labels=labels, generator=g)
    png = save_samples_png(x, out)
    print(f"wrote {n} samples ({kind} checkpoint, {sampler} sampler, {steps} step{'s' * (steps != 1)}) "
          f"to {png}")


# ----------------------------------------------------------------------------------------------- data, presets
@app.command(help="decode an image folder / EDM zip / tar shards / CIFAR-10 / npz once into the fast prepared format "
                  "(uint8 .npy + labels + meta.json)")
def data(
    source: str = typer.Argument(..., help="the data: a folder (class sub-folders), EDM zip or folder, .tar shards, "
                                 "the CIFAR-10 python batch folder or an .npz"),
    out: str | None = typer.Argument(None, help="output directory (images.npy, labels.npy, meta.json)"),
    kind: DataKind | None = typer.Option(None, "--kind", help="default: detected"),
    split: Split = typer.Option("train", "--split", help="cifar10 / npz split"),
    resolution: int | None = typer.Option(None, "--resolution",
                                          help="resize every image to R x R (required for mixed sizes)"),
    crop: Crop = typer.Option("none", "--crop", help="center-crop to a square first"),
    channels: Channels | None = typer.Option(None, "--channels",
                                             help="1 = grayscale, 3 = RGB (default: from the files)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it is a prepared set"),
    workers: int | None = typer.Option(None, "--workers",
                                       help="decoding processes (default: one per CPU core; 0 = this process)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    verify_: bool = typer.Option(False, "--verify", help="check OUT's images against the recorded sha256 and its "
                                 "source's fingerprint"),
) -> None:
    from .prepare import convert, verify

    if verify_:
        if out is not None:
            raise UsageError("--verify takes one prepared directory: quickstep-train data --verify OUT")
        verify(source)
        print(f"{source}: images match their recorded sha256; the source is unchanged or gone")
        return
    if out is None:
        raise UsageError("give SOURCE and OUT: quickstep-train data my_images/ data/my_images")
    if resolution is not None and resolution < 1:
        raise UsageError(f"--resolution must be >= 1, got {resolution}")
    meta = convert(source, out, kind=kind and kind.value, split=split.value, resolution=resolution,
                   crop=crop.value, channels=channels and int(channels.value), overwrite=overwrite,
                   progress=not quiet, workers=workers)
    n, c, h, w = meta["shape"]
    names = meta["class_names"]
    print(f"wrote {n} images {c}x{h}x{w} ({n * c * h * w / 2**20:.1f} MiB uint8), {meta['num_classes']} classes"
          f"{' ' + str(names[:10]) if names else ''} to {out} in {meta['seconds']:.1f} s; mean "
          f"{meta['mean']}, std {meta['std']} (in [-1, 1] units)\n"
          f"train: quickstep-train fit --preset PRESET --data {out} --out runs/NAME")


@app.command(help="list the shipped presets")
def presets() -> None:
    from .config import list_presets, preset_dict

    for name in list_presets():
        d = preset_dict(name)
        objs = "+".join(d.get("objectives", {})) or "-"
        print(f"{name:18s} data={d.get('data', {}).get('name', '?'):8s} model={d.get('model', {}).get('kind', '?'):5s} "
              f"objectives={objs} steps={d.get('steps', '?')} batch={d.get('batch_size', '?')}")


for _mod in ("quickstep.train.eval.cli",):  # extension slots owned by other stages
    if importlib.util.find_spec("quickstep.train.eval") and importlib.util.find_spec(_mod):
        importlib.import_module(_mod).register(app)


# ----------------------------------------------------------------------------------------------- entry points
def parse(argv: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """The sub-command a command line names and its parameters (parsed, not run)."""
    group = typer.main.get_command(app)
    name, *rest = argv
    return name, group.commands[name].make_context(name, list(rest)).params


def main(argv: Sequence[str] | None = None) -> int:
    """Run quickstep-train on `argv` (default: sys.argv); the exit status.  Bad input is one line, exit 2."""
    from .config import ConfigError

    try:
        return run_app(app, argv, PROG)
    except (UsageError, ConfigError) as e:
        return _fail(str(e))
    except (ValueError, FileNotFoundError, KeyError) as e:  # data/model problems caused by the user's input
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        return _fail(str(msg))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
