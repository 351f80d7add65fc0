"""Piecewise Euler sampling: one signature for students and teachers.

``sample(denoiser, noise, windows, steps)`` spreads ``steps`` evenly over the windows and,
inside window ``(t_start, t_end)``, takes Euler steps along the velocity towards ``t_end``.
A teacher sampled with ``TimeWindows(n)`` and ``n`` steps is DDIM with ``n`` steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .conditioning import Cond
from .solvers import solver_steps
from .teachers import Denoiser
from .windows import TimeWindows


@torch.no_grad()
def sample(denoiser: Denoiser, noise: Tensor, windows: TimeWindows, steps: int, cond: Cond = None,
           uncond: Cond = None, guidance: float = 1.0,
           return_trajectory: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Integrate from ``noise`` at t = 1 to t = 0.

    Returns the samples, or with ``return_trajectory`` also a ``(steps + 1, *noise.shape)``
    tensor of the states (first row: the noise).
    """
    edges = windows.edges().tolist()
    x, states = noise, [noise]
    for i, n in enumerate(windows.steps_per_window(steps)):
        for state in solver_steps(denoiser, x, edges[i], edges[i + 1], n, cond, uncond, guidance, windows):
            if return_trajectory:
                states.append(state)
        x = state
    if return_trajectory:
        return x, torch.stack([s.to(x.dtype) for s in states])
    return x
