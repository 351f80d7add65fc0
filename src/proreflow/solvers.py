"""ODE solvers inside a window: DDIM for diffusion teachers, Euler for velocity models.

Both are one loop: on a uniform grid ``t_start = s_0 > s_1 > ... > s_S = t_end`` take
``x <- x + (s_{j+1} - s_j) * v`` with ``v = denoiser.velocity(x, s_j, target_j)``. With
``target_j = s_{j+1}`` a diffusion denoiser's velocity makes each step exactly a DDIM step
(:mod:`proreflow.parametrize`); a velocity denoiser gives Euler. With ``windows`` given,
``target_j`` is the end of the window holding the step: the piecewise-straight sampling of
a student (used by :func:`proreflow.sampling.sample` and by a student acting as teacher).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch
from torch import Tensor

from .conditioning import Cond
from .schedules import bcast, compute_dtype
from .teachers import Denoiser
from .windows import TimeWindows

REFERENCE_STEPS = 32
"""DDIM steps that stand for the teacher's exact ODE over t in [0, 1]: the reference of fidelity and
of the evaluation suites, the trajectory plots, prompt-only start points and the original
teacher's default solver steps (``32 // windows`` per window)."""

def per_sample_time(t, like: Tensor) -> Tensor:
    """A time (float or tensor) as a ``(B,)`` tensor in ``like``'s compute dtype."""
    return torch.as_tensor(t, dtype=compute_dtype(like), device=like.device).reshape(-1).expand(like.shape[0])


def solver_steps(denoiser: Denoiser, x: Tensor, t_start, t_end, steps: int, cond: Cond = None,
                 uncond: Cond = None, guidance: float = 1.0,
                 windows: TimeWindows | None = None) -> Iterator[Tensor]:
    """Yield ``x`` after each of ``steps`` steps from ``t_start`` to ``t_end`` (per-sample times)."""
    if steps < 1:
        raise ValueError(f"a solve needs at least one step, got steps={steps}")
    x = x.to(compute_dtype(x))
    # the grid in float64 (as TimeWindows.time_grid), then rounded once to the compute dtype
    t0, t1 = (torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
              for t in (t_start, t_end))
    grid = [(t0 + (t1 - t0) * j / steps).to(x.dtype) for j in range(steps + 1)]
    for j in range(steps):
        s, s_next = grid[j], grid[j + 1]
        target = s_next if windows is None else windows.bounds((s + s_next) / 2)[1].to(s.dtype)
        v = denoiser.velocity(x, s, target, cond, uncond, guidance)
        x = x + bcast(s_next - s, x) * v
        yield x


def solve(denoiser: Denoiser, x: Tensor, t_start, t_end, steps: int, cond: Cond = None,
          uncond: Cond = None, guidance: float = 1.0, windows: TimeWindows | None = None) -> Tensor:
    """Solve the denoiser's ODE from ``t_start`` to ``t_end`` in ``steps`` steps (see module doc)."""
    return deque(solver_steps(denoiser, x, t_start, t_end, steps, cond, uncond, guidance, windows), maxlen=1)[0]
