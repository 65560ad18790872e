"""Which step of the 2-step sampler loses quality: swap each step of a trained student for the exact map Phi*, and
report log-likelihood and sliced W1 (and the data floor of both).

    OMP_NUM_THREADS=1 python scripts/students_twostep.py ring8 scd+noaw-s0   (a run under runs/students/<mixture>/)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import students  # noqa: E402  (scripts/students.py: the quality metrics)
from quickstep.train.core import checkpoint as ckpt  # noqa: E402
from quickstep.train.core.trigflow import t_max  # noqa: E402
from quickstep.train.data import gmm_preset  # noqa: E402
from quickstep.train.eval.gmm_diagnostics import exact_consistency_map  # noqa: E402


@torch.no_grad()
def main(mixture: str, run: str, n: int = 4000) -> None:
    torch.set_num_threads(1)
    mix = gmm_preset(mixture)
    model = ckpt.load_model(ckpt.find_checkpoint(students.RUNS / mixture / run)).eval()
    tm = t_max(sigma_data=model.sigma_data)
    g = torch.Generator().manual_seed(102)
    z0 = model.sigma_data * torch.randn(n, mix.dim, generator=g)
    z1 = model.sigma_data * torch.randn(n, mix.dim, generator=g)

    def ll(x: torch.Tensor) -> str:
        q = students.quality(x, mix, 5)
        return f"ll {q['log_likelihood']:.3f} W1 {q['sliced_w1']:.4f}"

    first = {"student": model.consistency(z0, torch.full((n,), tm)),
             "exact": exact_consistency_map(mix, z0.double(), torch.full((n,), tm, dtype=torch.float64)).float()}
    floor = students.quality(mix.sample(n, g), mix, 5)
    print(f"data floor: ll {floor['log_likelihood']:.3f} W1 {floor['sliced_w1']:.4f}")
    print(f"1-step: student {ll(first['student'])}, exact map {ll(first['exact'])}")
    for tmid in (0.4, 0.7, 1.0, 1.2):
        t = torch.full((n,), tmid)
        for name, x0 in first.items():
            xm = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * z1
            second_student = model.consistency(xm, t)
            second_exact = exact_consistency_map(mix, xm.double(), t.double()).float()
            print(f"t_mid {tmid}: first step {name:7s} -> second step student {ll(second_student)}, "
                  f"exact {ll(second_exact)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
