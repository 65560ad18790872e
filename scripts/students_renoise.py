"""Does the 2-step sampler's fresh noise cost log-likelihood?  Re-noise the first step's output x0 to t_mid with
e = gamma * z' + sqrt(1 - gamma^2) * z_hat, where z' is fresh noise (gamma = 1: sCM's multistep sampler, Song et al.
2023 Alg. 1) and z_hat = (x_T - cos(T) x0) / sin(T) is the noise the first step implies (gamma = 0: a DDIM-like
deterministic step, as in CTM's gamma-sampling), then apply the student at t_mid.  Scored like `students.py
--rescore`: 64 000 samples against one reference draw (seed 300), sliced W1 and mean exact log-likelihood.

    OMP_NUM_THREADS=1 python scripts/students_renoise.py ring8 scd-final-exact --seeds 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import students  # noqa: E402  (scripts/students.py: recipes, training, teachers)
from quickstep.train.core import checkpoint as ckpt  # noqa: E402
from quickstep.train.core.trigflow import t_max  # noqa: E402
from quickstep.train.data import gmm_preset  # noqa: E402

T_MIDS = (0.2, 0.4, 0.7, 1.0, 1.3)
GAMMAS = (0.0, 0.5, 1.0)


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mixture")
    p.add_argument("recipe")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n", type=int, default=64000)
    a = p.parse_args()
    torch.set_num_threads(1)
    mix = gmm_preset(a.mixture)
    scored, floor = students.one_reference(mix, a.n)

    def score(x: torch.Tensor) -> list[float]:
        q = scored(x)
        return [q["sliced_w1"], q["log_likelihood"]]

    print("floor (W1, log-lik)", score(floor), flush=True)
    for seed in [int(s) for s in a.seeds.split(",")]:
        out, _ = students.train_run(a.mixture, a.recipe, seed, students.DEFAULT_STEPS, 3000)
        model = ckpt.load_model(ckpt.find_checkpoint(out), which="ema").eval().requires_grad_(False)
        tm = torch.tensor(t_max(sigma_data=model.sigma_data))
        gn = torch.Generator().manual_seed(310)
        z = model.sigma_data * torch.randn(a.n, mix.dim, generator=gn)  # [n, D]
        fresh = model.sigma_data * torch.randn(a.n, mix.dim, generator=gn)  # [n, D]
        x0 = model.consistency(z, tm.expand(a.n))  # [n, D]
        implied = (z - torch.cos(tm) * x0) / torch.sin(tm)  # [n, D]
        row = {"1-step": score(x0)}
        for t_mid in T_MIDS:
            t = torch.full((a.n,), t_mid)
            for gamma in GAMMAS:
                e = gamma * fresh + (1 - gamma**2) ** 0.5 * implied
                row[f"t_mid {t_mid}, gamma {gamma}"] = score(model.consistency(torch.cos(t)[:, None] * x0
                                                                               + torch.sin(t)[:, None] * e, t))
        print(a.recipe, seed, json.dumps({k: [round(v[0], 5), round(v[1], 4)] for k, v in row.items()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
