"""Fidelity to the teacher and trajectory straightness (any data, any sampler).

Fidelity: mean over samples of the per-element RMS distance between a sampler's output
``s_i`` and the teacher's DDIM-32 output ``r_i`` from the same noise and condition,

    fidelity = (1 / N) sum_i || s_i - r_i ||_2 / sqrt(D),       D = elements per sample,

so it reads in data units (pixels in [-1, 1], 2D coordinates) whatever the dimension.

Straightness of a trajectory ``x_0 (noise, t_0 = 1), x_1, ..., x_n (t_n = 0)`` with step
velocities ``v_i = (x_{i+1} - x_i) / (t_{i+1} - t_i)`` and the end-to-end velocity
``v* = (x_n - x_0) / (t_n - t_0)`` (noise minus sample):

    S = sum_i (t_i - t_{i+1}) * (1 / N) sum_b || v_i^b - v*^b ||^2 / D,

a Riemann sum of ``int_0^1 E || v(x_t, t) - v* ||^2 dt / D`` (Liu et al. 2022). It is 0 exactly
when every sample moves along one straight line at constant speed (a 1-step sampler always).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..conditioning import Cond
from ..sampling import sample
from ..solvers import REFERENCE_STEPS
from ..teachers import Denoiser
from ..windows import TimeWindows


def fidelity(samples: Tensor, reference: Tensor) -> float:
    """``mean_i ||s_i - r_i|| / sqrt(D)`` between paired samples (same noise, same condition)."""
    if samples.shape != reference.shape:
        raise ValueError(f"paired samples need equal shapes, got {tuple(samples.shape)} and {tuple(reference.shape)}")
    diff = (samples.detach().double() - reference.detach().double().to(samples.device)).flatten(1)
    return float(diff.pow(2).mean(dim=1).sqrt().mean())


def trajectory_times(windows: TimeWindows, steps: int) -> Tensor:
    """The ``steps + 1`` times of :func:`proreflow.sampling.sample`'s trajectory, from 1 to 0."""
    return torch.tensor([1.0] + [t_next for _, t_next, _ in windows.time_grid(steps)], dtype=torch.float64)


def straightness(trajectory: Tensor, times: Tensor) -> float:
    """``S`` of a trajectory ``(n + 1, B, ...)`` at ``times`` ``(n + 1,)`` (see module doc)."""
    times = torch.as_tensor(times, dtype=torch.float64)
    if trajectory.shape[0] != times.numel() or times.numel() < 2:
        raise ValueError(f"a trajectory of {trajectory.shape[0]} states needs as many times (at least 2), "
                         f"got {times.numel()}")
    x = trajectory.detach().double().cpu().flatten(2)  # (n + 1, B, D)
    dt = times[1:] - times[:-1]
    v = (x[1:] - x[:-1]) / dt.reshape(-1, 1, 1)
    v_star = (x[-1] - x[0]) / (times[-1] - times[0])
    per_step = (v - v_star).pow(2).mean(dim=2).mean(dim=1)  # (n,)
    return float((dt.abs() * per_step).sum())


def sampler_straightness(denoiser: Denoiser, noise: Tensor, windows: TimeWindows, steps: int, cond: Cond = None,
                         uncond: Cond = None, guidance: float = 1.0) -> float:
    """Straightness of ``sample(denoiser, noise, windows, steps, ...)``'s trajectory."""
    _, trajectory = sample(denoiser, noise, windows, steps, cond, uncond, guidance, return_trajectory=True)
    return straightness(trajectory, trajectory_times(windows, steps))


def fidelity_to_teacher(denoiser: Denoiser, teacher: Denoiser, noise: Tensor, windows: TimeWindows, steps: int,
                        cond: Cond = None, uncond: Cond = None, guidance: float = 1.0,
                        teacher_steps: int = REFERENCE_STEPS) -> float:
    """:func:`fidelity` of ``denoiser``'s ``steps``-step samples to the teacher's DDIM-``teacher_steps``
    samples from the same ``noise``, ``cond`` and ``guidance``."""
    ours = sample(denoiser, noise, windows, steps, cond, uncond, guidance)
    reference = sample(teacher, noise, TimeWindows(teacher_steps), teacher_steps, cond, uncond, guidance)
    return fidelity(ours, reference)
