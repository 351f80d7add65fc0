"""Piecewise Euler sampling: one signature for students and teachers.

``sample(denoiser, noise, windows, steps)`` spreads ``steps`` evenly over the windows and,
inside window ``(t_start, t_end)``, takes Euler steps along the velocity towards ``t_end``: the
grid ``windows.time_grid(steps)`` is built once and stepped along by :func:`~proreflow.solvers.euler_steps`.
A teacher sampled with ``TimeWindows(n)`` and ``n`` steps is DDIM with ``n`` steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .conditioning import Cond
from .solvers import euler_steps
from .teachers import Denoiser
from .windows import TimeWindows


@torch.no_grad()
def sample(denoiser: Denoiser, noise: Tensor, windows: TimeWindows, steps: int, cond: Cond = None,
           uncond: Cond = None, guidance: float = 1.0,
           return_trajectory: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Integrate from ``noise`` at t = 1 to t = 0.

    Returns the samples, or with ``return_trajectory`` also a ``(steps + 1, *noise.shape)``
    tensor of the states (first row: the noise). A step-conditioned student runs at ``windows.count``
    (:meth:`~proreflow.teachers.Denoiser.at_windows`) unless it was given a count.
    """
    if denoiser.step_counts and denoiser.count is None:
        denoiser = denoiser.at_windows(windows.count)
    x, states = noise, [noise]
    for x in euler_steps(denoiser, noise, windows.time_grid(steps), cond, uncond, guidance):
        if return_trajectory:
            states.append(x)
    if return_trajectory:
        return x, torch.stack([s.to(x.dtype) for s in states])
    return x
