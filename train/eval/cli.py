"""`quickstep-train eval`: the evaluation sub-command, picked up by `quickstep.train.cli` through `register`.

    quickstep-train eval --ckpt DIR [--steps 1,2] [--n 1000] --out DIR [--teacher DIR] [--inception PATH]
                         [--nll-n N] [--seed S] [--device cpu|cuda] [--no-progress] [--sweep-t-mid [--record-times]]
"""

from __future__ import annotations

import argparse
import json


def parse_steps(text: str | None) -> tuple[int, ...] | None:
    """'1,2' -> (1, 2); a clear error naming the allowed form otherwise."""
    if text is None or text.strip() == "":
        return None
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--steps must be a comma-separated list of positive integers (e.g. 1,2), got {text!r}") from None
    if any(s < 1 for s in steps):
        raise ValueError(f"--steps must be positive integers (e.g. 1,2), got {text!r}")
    return steps


def eval_command(args: argparse.Namespace) -> int:
    """Run `evaluate_checkpoint` from parsed arguments; print where the report went and the headline numbers."""
    from .report import evaluate_checkpoint

    if args.n < 4:
        raise ValueError(f"--n must be >= 4, got {args.n}")
    if args.diagnostics_n < 8:
        raise ValueError(f"--diag-n must be >= 8, got {args.diagnostics_n}")
    report = evaluate_checkpoint(args.ckpt, steps=parse_steps(args.steps), n=args.n, out=args.out,
                                 teacher=args.teacher, inception=args.inception, nll_n=args.nll_n,
                                 diagnostics_n=args.diagnostics_n, seed=args.seed,
                                 device=args.device, progress=not args.no_progress,
                                 sweep_t_mid=args.sweep_t_mid, record_times=args.record_times)
    for row in report["quality"]:
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}))
    print(f"wrote {args.out}/report.json, report.md and {len(report['figures'])} figures "
          f"in {report['seconds']:.1f} s")
    return 0


def register(subparsers) -> None:
    """Add the `eval` sub-command to quickstep-train's sub-parsers."""
    e = subparsers.add_parser("eval", help="evaluate a checkpoint: report.json, report.md and plots")
    e.add_argument("--ckpt", required=True, help="checkpoint or run directory (its latest checkpoint)")
    e.add_argument("--steps", default=None,
                   help="comma-separated step counts: consistency steps for students (default 1,2), "
                        "Heun steps for teachers (default 2,4,9,18)")
    e.add_argument("--n", type=int, default=1000, help="samples per setting (default 1000)")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--teacher", default=None, help="teacher checkpoint for the student's ODE error")
    e.add_argument("--inception", default=None,
                   help="local FID Inception-v3 weights (.safetensors or .pt/.pth state dict) for image data "
                        "other than digits")
    e.add_argument("--nll-n", dest="nll_n", type=int, default=None,
                   help="test samples for the PF-ODE likelihood of teachers (0 skips; default 500 vectors, 32 images)")
    e.add_argument("--diag-n", dest="diagnostics_n", type=int, default=512,
                   help="noisy samples per sigma band for the exact GMM diagnostics (default 512)")
    e.add_argument("--sweep-t-mid", dest="sweep_t_mid", action="store_true",
                   help="students: sweep the 2-step intermediate time against the data and sample 2 steps at the best")
    e.add_argument("--record-times", dest="record_times", action="store_true",
                   help="with --sweep-t-mid: write the chosen sampler times into the checkpoint's config.json "
                        "(export and the server then use them)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="cpu")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=eval_command)
