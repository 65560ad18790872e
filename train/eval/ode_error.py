"""ODE-solving error of a consistency student (Direct CMs, "better ODE solving does not imply better samples"):
||f_student(x_T) - Phi_teacher(x_T)|| over shared noise, where Phi_teacher is the teacher's deterministic Heun
PF-ODE solve (EDM Algorithm 2, `heun_steps` steps = 2 heun_steps - 1 NFE) from the same starting point.

Both start at x_sigma = sigma_max eps (eps ~ N(0, I)): the student's 1-step sample is its EDM-view denoiser at
sigma_max (= the sCM 1-step sampler at t_max = arctan(sigma_max / sigma_d)), as in
`losses.direct_cm.ode_error`.  Reported: the mean squared error per coordinate (the Direct-CM paper's "ODE
error"), the RMS and the mean per-sample L2 distance, with NFE and wall time per image of both solvers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..core.sampling import heun_teacher_sample, one_step_sample


@dataclass(frozen=True)
class ODEError:
    """Student-vs-teacher PF-ODE error over shared noise."""

    mse: float  # mean over samples and coordinates of (student - teacher)^2
    rmse: float
    l2_mean: float  # mean over samples of ||student - teacher||_2
    n: int
    student_nfe: int
    teacher_nfe: int
    student_seconds_per_image: float
    teacher_seconds_per_image: float

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


@torch.no_grad()
def teacher_solution(teacher, noise: torch.Tensor, *, heun_steps: int = 18,
                     class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher's Heun PF-ODE solution from x = sigma_max eps ([B, ...]; eps = `noise`, standard normal)."""
    return heun_teacher_sample(teacher, noise, num_steps=heun_steps, class_labels=class_labels)


student_one_step = one_step_sample  # the student's 1-step sample from the same x = sigma_max eps


@torch.no_grad()
def ode_error(student, teacher, noise: torch.Tensor, *, heun_steps: int = 18,
              class_labels: torch.Tensor | None = None, batch_size: int = 1024) -> ODEError:
    """Direct-CM ODE error of `student` against `teacher` for standard-normal noise eps [N, ...]."""
    if heun_steps < 1:
        raise ValueError(f"heun_steps must be >= 1, got {heun_steps}")
    n = noise.shape[0]
    sq, l2 = [], []
    ts = tt = 0.0
    for i in range(0, n, batch_size):
        eps = noise[i : i + batch_size]
        y = None if class_labels is None else class_labels[i : i + batch_size]
        t0 = time.perf_counter()
        ref = teacher_solution(teacher, eps, heun_steps=heun_steps, class_labels=y)
        t1 = time.perf_counter()
        one = student_one_step(student, eps, y)
        t2 = time.perf_counter()
        tt, ts = tt + (t1 - t0), ts + (t2 - t1)
        d = (one - ref).flatten(1).double()
        sq.append(d.square().mean(1))
        l2.append(d.norm(dim=1))
    mse = float(torch.cat(sq).mean())
    return ODEError(mse=mse, rmse=mse**0.5, l2_mean=float(torch.cat(l2).mean()), n=n, student_nfe=1,
                    teacher_nfe=2 * heun_steps - 1, student_seconds_per_image=ts / n,
                    teacher_seconds_per_image=tt / n)


__all__ = ["ODEError", "ode_error", "student_one_step", "teacher_solution"]
