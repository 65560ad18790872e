"""Record how a bundle was made in its manifest: the exact commands, training time and hardware of each run.

    python scripts/annotate_bundle.py BUNDLE --run teacher=runs/teacher:"quickstep-train fit ..." \
        --run student=runs/student:"quickstep-train fit ..." --command "quickstep-export onnx ..."

Training time is read from each run's log.jsonl (first to last logged step); the manifest gets a `provenance`
section.  manifest.json is not itself hashed, so the file table stays valid.

    python scripts/annotate_bundle.py BUNDLE --class-names 0,1,2,3,4,5,6,7,8,9 \
        --class-aliases zero=0,one=1,two=2,three=3,four=4,five=5,six=6,seven=7,eight=8,nine=9

sets the class names (index-aligned, one per class) and the extra prompt words the OpenAI images route maps to
classes; the bundle is re-read by the server's loader afterwards, so a mismatch with num_classes fails here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from quickstep.export.bundle import read_manifest, write_manifest
from quickstep.train.loop import read_train_log, resume_gaps, training_seconds


def run_summary(run_dir: Path, up_to_step: int | None) -> dict:
    """Steps and training wall time of a run from its JSONL log (first to last logged step, less the time a resumed
    run lay stopped)."""
    rows = [r for r in read_train_log(run_dir) if up_to_step is None or r["step"] <= up_to_step]
    if not rows:
        raise SystemExit(f"{run_dir}/log.jsonl has no logged steps")
    idle = resume_gaps(rows)
    out = {"steps": rows[-1]["step"], "kimg": rows[-1].get("kimg"), "wall_s": round(training_seconds(rows)[-1], 1),
           "first_logged_step": rows[0]["step"]}
    if idle:
        out["resumed"] = len(idle)
    return out


def hardware() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--run", action="append", default=[], metavar="NAME=DIR[@STEP]:COMMAND",
                    help="a training run: its name, run directory (optionally @step used), and the command")
    ap.add_argument("--command", action="append", default=[], help="another command of the pipeline (export, report)")
    ap.add_argument("--note", default=None)
    ap.add_argument("--class-names", default=None, help="comma-separated class names, one per class, in index order")
    ap.add_argument("--class-aliases", default=None, help="comma-separated WORD=INDEX prompt aliases")
    args = ap.parse_args(argv)
    if args.class_names is not None or args.class_aliases is not None:
        return annotate_classes(args.bundle, args.class_names, args.class_aliases)

    runs = {}
    for spec in args.run:
        name, rest = spec.split("=", 1)
        where, command = rest.split(":", 1)
        path, sep, step = where.rpartition("@")
        if not (sep and step.isdigit()):  # no @STEP: an "@" inside the directory name (e.g. scd-noaw@2400-s0) stays
            path, step = where, ""
        runs[name] = {"command": command, "run_dir": path,
                      **run_summary(Path(path), int(step) if step else None)}
    manifest = read_manifest(args.bundle)
    manifest.provenance = {"runs": runs, "commands": args.command, "hardware": hardware(), "note": args.note}
    write_manifest(args.bundle, manifest)
    json.dump(manifest.provenance, sys.stdout, indent=2)
    print()
    return 0


def annotate_classes(bundle: Path, names: str | None, aliases: str | None) -> int:
    """Write class_names / class_aliases into the manifest, then load the bundle as the server does."""
    from quickstep.serve.bundle import load_bundle

    manifest = read_manifest(bundle)
    if names is not None:
        manifest.class_names = [x.strip() for x in names.split(",")]
    if aliases is not None:
        pairs = [a.split("=", 1) for a in aliases.split(",") if a.strip()]
        manifest.class_aliases = {w.strip(): int(i) for w, i in pairs}
    write_manifest(bundle, manifest)
    b = load_bundle(bundle)
    print(json.dumps({"class_names": b.class_names, "class_aliases": b.class_aliases}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
