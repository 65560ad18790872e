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

Bad input (unknown preset, key or value, missing checkpoint) prints one clear line and exits with code 2.
Other stages add sub-commands: a module `quickstep.train.eval.cli` exposing `register(subparsers)` is picked
up automatically (it adds parsers whose `func(args) -> int` runs the command).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

EXIT_USAGE = 2
SAMPLERS = ("heun", "euler", "sde", "consistency")
DEFAULT_STEPS = {"consistency": 1, "heun": 18, "euler": 18, "sde": 18}  # when --steps is not given


class UsageError(Exception):
    """Bad user input: printed as one line, exit code 2."""


def _fail(msg: str) -> int:
    print(f"quickstep-train: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


# ----------------------------------------------------------------------------------------------- fit
def cmd_fit(args: argparse.Namespace) -> int:
    from .config import build_config, load_preset
    from .core.checkpoint import CheckpointError
    from .loop import NonFiniteLossError, Trainer, config_from_checkpoint, data_std

    if args.resume:
        if args.preset or args.data or args.set:
            raise UsageError("--resume continues a run with its saved config; do not combine it with "
                             "--preset/--data/--set (only --steps may extend the run)")
        cfg = config_from_checkpoint(args.resume)
    else:
        if not args.preset:
            from .config import list_presets

            raise UsageError(f"--preset is required; valid presets: {', '.join(list_presets())}")
        cfg = load_preset(args.preset, args.set or [], data_path=args.data)
    if args.steps is not None:
        if args.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {args.steps}")
        cfg = cfg.model_copy(update={"steps": args.steps})
    cfg = build_config(cfg.to_dict())
    if args.dry_run:
        from .config import model_config
        from .data import load_dataset

        d = cfg.data
        ds = load_dataset(d.name, path=d.path, split=d.split, seed=cfg.seed, resolution=d.resolution, crop=d.crop,
                          stream=True, **dict(d.options))
        mc = model_config(cfg, ds.spec, data_std=data_std(ds))
        from .core.model import build_model

        n_params = sum(p.numel() for p in build_model(mc).parameters())
        print(json.dumps({"train": cfg.to_dict(), "data": ds.spec.to_dict(), "num_samples": len(ds),
                          "model": mc.to_dict(), "parameters": n_params}, indent=2, default=str))
        return 0
    out = Path(args.out)
    try:
        trainer = Trainer(cfg, out, resume=args.resume, teacher=args.teacher)
    except CheckpointError as e:
        raise UsageError(str(e)) from e
    try:
        result = trainer.fit()
    except NonFiniteLossError as e:
        print(f"quickstep-train: training stopped: {e}", file=sys.stderr)
        return 1
    finally:
        trainer.close()
    if trainer.rank == 0:
        print(f"trained {result.step} steps; last checkpoint: {result.checkpoint}")
    return 0


# ----------------------------------------------------------------------------------------------- sample
def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from .core import checkpoint as ckpt
    from .core.sampling import karras_sigmas, sample_consistency, sample_euler, sample_heun, sample_sde
    from .loop import find_checkpoint, save_samples_png

    if args.n < 1:
        raise UsageError(f"-n must be >= 1, got {args.n}")
    try:
        path = find_checkpoint(args.ckpt)
        config = ckpt.load_meta(path)
        kind = config.kind
        times = ckpt.recorded_times(config)  # the checkpoint's own consistency times, when it records them
        sampler = args.sampler or ("consistency" if kind == "consistency" else "heun")
        steps = args.steps if args.steps is not None else DEFAULT_STEPS[sampler]
        if steps < 1:
            what = ("1 = one-step, 2 = two-step sCM sampling" if sampler == "consistency"
                    else "the number of noise levels of the Karras grid")
            raise UsageError(f"--steps must be >= 1 for the {sampler} sampler ({what}), got {steps}")
        model = ckpt.load_model(path, which=args.weights)
    except ckpt.CheckpointError as e:
        raise UsageError(str(e)) from e
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    labels = None
    if model.num_classes > 0:
        if args.class_label is not None:
            if not 0 <= args.class_label < model.num_classes:
                raise UsageError(f"--class must be in [0, {model.num_classes - 1}], got {args.class_label}")
            labels = torch.full((args.n,), args.class_label, dtype=torch.long, device=device)
        else:
            labels = torch.arange(args.n, device=device) % model.num_classes
    elif args.class_label is not None:
        raise UsageError("--class given, but the model is unconditional")
    eps = torch.randn((args.n, *model.sample_shape), generator=g, device=device)
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
    png = save_samples_png(x, args.out)
    print(f"wrote {args.n} samples ({kind} checkpoint, {sampler} sampler, {steps} step{'s' * (steps != 1)}) "
          f"to {png}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .prepare import convert, verify

    if args.verify:
        if args.out is not None:
            raise UsageError("--verify takes one prepared directory: quickstep-train data --verify OUT")
        verify(args.source)
        print(f"{args.source}: images match their recorded sha256; the source is unchanged or gone")
        return 0
    if args.out is None:
        raise UsageError("give SOURCE and OUT: quickstep-train data my_images/ data/my_images")
    if args.resolution is not None and args.resolution < 1:
        raise UsageError(f"--resolution must be >= 1, got {args.resolution}")
    meta = convert(args.source, args.out, kind=args.kind, split=args.split, resolution=args.resolution,
                   crop=args.crop, channels=args.channels, overwrite=args.overwrite, progress=not args.quiet,
                   workers=args.workers)
    n, c, h, w = meta["shape"]
    names = meta["class_names"]
    print(f"wrote {n} images {c}x{h}x{w} ({n * c * h * w / 2**20:.1f} MiB uint8), {meta['num_classes']} classes"
          f"{' ' + str(names[:10]) if names else ''} to {args.out} in {meta['seconds']:.1f} s; mean "
          f"{meta['mean']}, std {meta['std']} (in [-1, 1] units)\n"
          f"train: quickstep-train fit --preset PRESET --data {args.out} --out runs/NAME")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .config import list_presets, preset_dict

    for name in list_presets():
        d = preset_dict(name)
        objs = "+".join(d.get("objectives", {})) or "-"
        print(f"{name:18s} data={d.get('data', {}).get('name', '?'):8s} model={d.get('model', {}).get('kind', '?'):5s} "
              f"objectives={objs} steps={d.get('steps', '?')} batch={d.get('batch_size', '?')}")
    return 0


# ----------------------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: exit 2 with the usage line, no traceback
        self.print_usage(sys.stderr)
        raise SystemExit(_fail(message))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="quickstep-train", description="Train TrigFlow diffusion teachers and consistency models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    f = sub.add_parser("fit", help="train from a preset (or resume a run)")
    f.add_argument("--preset", help="preset name (see `quickstep-train presets`)")
    f.add_argument("--data", help="data replacing the preset's: a `quickstep-train data` output, an image folder, an "
                   "EDM zip/folder, .tar shards, a CIFAR-10 batch folder or an .npz (same kind as the preset's)")
    f.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    f.add_argument("--out", required=True, help="run directory (checkpoints, logs, samples)")
    f.add_argument("--steps", type=int, help="total number of steps (overrides the preset)")
    f.add_argument("--resume", metavar="DIR", help="checkpoint or run directory to continue exactly")
    f.add_argument("--teacher", metavar="DIR", help="frozen teacher checkpoint (EMA weights) for distillation, or "
                   "gmm:<preset> for a Gaussian mixture's exact PF-ODE (e.g. gmm:ring8); "
                   "--resume reuses the teacher recorded in the checkpoint when this is not given")
    f.add_argument("--dry-run", action="store_true", help="print the resolved config and model size; no training")
    f.set_defaults(func=cmd_fit)

    s = sub.add_parser("sample", help="draw samples from a checkpoint into a PNG")
    s.add_argument("--ckpt", required=True, help="checkpoint or run directory")
    s.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="default: consistency for a consistency checkpoint (sCT/sCD/Direct CM/CD), else heun")
    s.add_argument("--steps", type=int, default=None, help="default: 1 for the consistency sampler, else 18")
    s.add_argument("-n", type=int, default=64)
    s.add_argument("--class", dest="class_label", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--weights", choices=("ema", "raw"), default="ema")
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True, help="PNG path")
    s.set_defaults(func=cmd_sample)

    dp = sub.add_parser("data", help="decode an image folder / EDM zip / tar shards / CIFAR-10 / npz once into the "
                        "fast prepared format (uint8 .npy + labels + meta.json)")
    dp.add_argument("source", help="the data: a folder (class sub-folders), EDM zip or folder, .tar shards, the "
                    "CIFAR-10 python batch folder or an .npz")
    dp.add_argument("out", nargs="?", help="output directory (images.npy, labels.npy, meta.json)")
    dp.add_argument("--kind", choices=("folder", "edm", "tar", "cifar10", "npz"), help="default: detected")
    dp.add_argument("--split", choices=("train", "test", "all"), default="train", help="cifar10 / npz split")
    dp.add_argument("--resolution", type=int, help="resize every image to R x R (required for mixed sizes)")
    dp.add_argument("--crop", choices=("none", "center"), default="none", help="center-crop to a square first")
    dp.add_argument("--channels", type=int, choices=(1, 3), help="1 = grayscale, 3 = RGB (default: from the files)")
    dp.add_argument("--overwrite", action="store_true", help="replace OUT if it is a prepared set")
    dp.add_argument("--workers", type=int, help="decoding processes (default: one per CPU core; 0 = this process)")
    dp.add_argument("--quiet", action="store_true", help="no progress bar")
    dp.add_argument("--verify", action="store_true", help="check OUT's images against the recorded sha256 and "
                    "its source's fingerprint")
    dp.set_defaults(func=cmd_data)

    pr = sub.add_parser("presets", help="list the shipped presets")
    pr.set_defaults(func=cmd_presets)

    for mod in ("quickstep.train.eval.cli",):  # extension slots owned by other stages
        if importlib.util.find_spec("quickstep.train.eval") and importlib.util.find_spec(mod):
            importlib.import_module(mod).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ConfigError) as e:
        return _fail(str(e))
    except (ValueError, FileNotFoundError, KeyError) as e:  # data/model problems caused by the user's input
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        return _fail(str(msg))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
