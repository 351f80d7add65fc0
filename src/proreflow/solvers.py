"""ODE solvers inside a window: DDIM for diffusion teachers, Euler for velocity models.

Both are one loop: on a uniform grid ``t_start = s_0 > s_1 > ... > s_S = t_end`` take
``x <- x + (s_{j+1} - s_j) * v`` with ``v = denoiser.velocity(x, s_j, target_j)``. With
``target_j = s_{j+1}`` a diffusion denoiser's velocity makes each step exactly a DDIM step
(:mod:`proreflow.parametrize`); a velocity denoiser gives Euler. With ``windows`` given,
``target_j`` is the end of the window holding the step: the piecewise-straight sampling of
a student (used by :func:`proreflow.sampling.sample` and by a student acting as teacher).

The grid is built once (:func:`solve_grid` here, ``TimeWindows.time_grid`` for sampling, both
from :func:`~proreflow.windows.uniform_times`) and passed to the one loop, :func:`euler_steps`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch
from torch import Tensor

from .conditioning import Cond
from .schedules import bcast, compute_dtype
from .teachers import Denoiser
from .windows import TimeWindows, uniform_times

REFERENCE_STEPS = 32
"""DDIM steps that stand for the teacher's exact ODE over t in [0, 1]: the reference of fidelity and
of the evaluation suites, the trajectory plots, prompt-only start points and the original
teacher's default solver steps (``32 // windows`` per window)."""


def per_sample_time(t, like: Tensor) -> Tensor:
    """A time (float or tensor) as a ``(B,)`` tensor in ``like``'s compute dtype."""
    return torch.as_tensor(t, dtype=compute_dtype(like), device=like.device).reshape(-1).expand(like.shape[0])


def solve_grid(t_start, t_end, steps: int, like: Tensor, windows: TimeWindows | None = None) -> Tensor:
    """The grid of a solve from ``t_start`` to ``t_end`` (per-sample times) in ``steps`` steps: rows
    ``(s_j, s_{j+1}, target_j)``, shape ``(steps, 3, B)`` in ``like``'s compute dtype (module doc).

    The times are :func:`~proreflow.windows.uniform_times` (float64), rounded once; ``target_j`` is
    ``s_{j+1}``, or with ``windows`` the end of the window holding the step's midpoint."""
    if steps < 1:
        raise ValueError(f"a solve needs at least one step, got steps={steps}")
    ends = (torch.as_tensor(t, dtype=torch.float64, device=like.device).reshape(-1).expand(like.shape[0])
            for t in (t_start, t_end))
    s = uniform_times(*ends, steps, like.device).to(compute_dtype(like))
    targets = s[1:] if windows is None else windows.bounds((s[:-1] + s[1:]) / 2)[1].to(s.dtype)
    return torch.stack([s[:-1], s[1:], targets], dim=1)


def euler_steps(denoiser: Denoiser, x: Tensor, grid, cond: Cond = None, uncond: Cond = None,
                guidance: float = 1.0) -> Iterator[Tensor]:
    """Yield ``x`` after each step ``x <- x + (t_next - t) * denoiser.velocity(x, t, target)`` along
    ``grid``'s rows ``(t, t_next, target)`` (floats, or per-sample ``(B,)`` tensors): the one
    stepping loop of :func:`solve` and :func:`proreflow.sampling.sample`."""
    x = x.to(compute_dtype(x))
    for row in grid:
        s, s_next, target = (per_sample_time(v, x) for v in row)
        v = denoiser.velocity(x, s, target, cond, uncond, guidance)
        x = x + bcast(s_next - s, x) * v
        yield x


def solve(denoiser: Denoiser, x: Tensor, t_start, t_end, steps: int, cond: Cond = None,
          uncond: Cond = None, guidance: float = 1.0, windows: TimeWindows | None = None) -> Tensor:
    """Solve the denoiser's ODE from ``t_start`` to ``t_end`` in ``steps`` steps (see module doc)."""
    grid = solve_grid(t_start, t_end, steps, x, windows)
    return deque(euler_steps(denoiser, x, grid, cond, uncond, guidance), maxlen=1)[0]
