"""Tangent size at the teacher initialisation (no training): E||g_n||^2 / D and the raw tangent RMS per sigma, for
sCT (single-sample velocity) and sCD (trained teacher, exact mixture teacher), with the student = the teacher.
The learned adaptive weighting drives e^u(t) to E||g_n||^2 / D, so this is the weighting's starting point.

    OMP_NUM_THREADS=1 python scripts/students_tangent_floor.py   (needs the teachers of scripts/students.py)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import students  # noqa: E402
from quickstep.train.core import checkpoint as ckpt  # noqa: E402
from quickstep.train.core.trigflow import sigma_to_t  # noqa: E402
from quickstep.train.data import gmm_preset  # noqa: E402
from quickstep.train.loop import exact_teacher  # noqa: E402
from quickstep.train.losses.scm import SCMConfig, per_sample_norm, scm_step, scm_velocity_scd  # noqa: E402


def main(n: int = 4096) -> None:
    torch.set_num_threads(1)
    out = {}
    for name in ("ring8", "aniso"):
        teacher = ckpt.load_model(ckpt.find_checkpoint(students.RUNS / f"teacher-{name}-3000")).eval()
        exact, mix = exact_teacher(name, teacher.sigma_data), gmm_preset(name)
        g = torch.Generator().manual_seed(0)
        rows = []
        for sigma in (0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0):
            t = torch.full((n,), float(sigma_to_t(sigma, teacher.sigma_data)))
            x0, z = mix.sample(n, g), teacher.sigma_data * torch.randn(n, mix.dim, generator=g)
            x_t = x0 * torch.cos(t)[:, None] + z * torch.sin(t)[:, None]
            row = {"sigma": sigma}
            for key, v in (("sct", None), ("scd_trained", scm_velocity_scd(teacher, x_t, t)),
                           ("scd_exact", scm_velocity_scd(exact, x_t, t))):
                o = scm_step(teacher, x0, z, t, v, SCMConfig(), r=1.0)
                row[key] = float(o.mse.mean())
                row[key + "_graw"] = float(per_sample_norm(o.g_raw, "rms").mean())
            rows.append(row)
            print(name, {k: f"{v:.3g}" for k, v in row.items()})
        out[name] = rows
    (students.OUT / "tangent_floor_at_init.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
