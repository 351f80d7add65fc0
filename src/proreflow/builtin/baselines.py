"""Training-free baselines on the same teacher: diffusers' DPM-Solver++ (2M).

The teacher is called through the same :class:`~proreflow.teachers.Denoiser` (same guidance,
same time convention: diffusers' integer timestep ``tau`` is ``t = (tau + 1) / T``,
:meth:`~proreflow.schedules.VPSchedule.time`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..conditioning import Cond
from ..schedules import VPSchedule
from ..teachers import Denoiser


@torch.no_grad()
def dpm_solver_sample(teacher: Denoiser, noise: Tensor, steps: int, cond: Cond = None, uncond: Cond = None,
                      guidance: float = 1.0, order: int = 2) -> Tensor:
    """Sample ``teacher`` with diffusers' ``DPMSolverMultistepScheduler`` (DPM-Solver++, ``order``)."""
    from diffusers import DPMSolverMultistepScheduler

    if not isinstance(teacher.schedule, VPSchedule) or teacher.prediction_type == "velocity":
        raise ValueError("DPM-Solver++ needs a VP diffusion teacher (epsilon / v_prediction / sample output); "
                         f"this one predicts {teacher.prediction_type!r}")
    betas = 1 - teacher.schedule.alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64),
                                                           teacher.schedule.alphas_cumprod[:-1]])
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=teacher.schedule.num_train_timesteps,
                                            trained_betas=betas.float().numpy(), algorithm_type="dpmsolver++",
                                            solver_order=order, prediction_type=teacher.prediction_type)
    scheduler.set_timesteps(steps)
    x = noise.float() * scheduler.init_noise_sigma
    for tau in scheduler.timesteps:
        t = teacher.schedule.time(torch.full((x.shape[0],), float(tau), device=x.device))
        out = teacher.predict(x, t, cond, uncond, guidance).float()
        x = scheduler.step(out, tau, x).prev_sample
    return x
