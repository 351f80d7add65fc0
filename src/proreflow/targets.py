"""Reflow training targets: the straight segment from a window's start to the teacher's landing.

For a time ``t`` in window ``(t_start, t_end)``:

    x_start = sqrt(abar(t_start)) x0 + sqrt(1 - abar(t_start)) eps      (forward noising)
              (a flow-matching teacher: (1 - sigma(t_start)) x0 + sigma(t_start) eps)
    x_end   = teacher ODE solve from (x_start, t_start) to t_end
    v       = (x_end - x_start) / (t_end - t_start)
    x_t     = x_start + (t - t_start) v

The student learns ``v`` at ``(x_t, t)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .conditioning import Cond
from .schedules import VPSchedule, bcast, compute_dtype
from .solvers import REFERENCE_STEPS, per_sample_time, solve
from .teachers import Denoiser
from .windows import TimeWindows


@dataclass
class ReflowBatch:
    """One training batch: inputs ``(x_t, t)``, target velocity and the window of each sample."""

    x_t: Tensor
    t: Tensor
    v_target: Tensor
    t_start: Tensor
    t_end: Tensor


@dataclass
class StageTeacher:
    """The teacher of a stage and how it crosses a window.

    ``windows=None``: a diffusion teacher, ``steps`` DDIM steps per window (Euler for a
    velocity teacher). ``windows`` set: a previous-stage student, piecewise straight over its
    own (finer) windows, ``steps`` Euler steps in all per window of the current stage.
    ``solver``: the original teacher's window solver (:data:`~proreflow.solvers.SOLVERS`).
    """

    denoiser: Denoiser
    steps: int
    windows: TimeWindows | None = None
    guidance: float = 1.0
    solver: str = "ddim"


def sample_times(batch: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """``t ~ U(0, 1]`` (t = 1 included, t = 0 excluded: every t lies inside a window)."""
    return 1.0 - torch.rand(batch, generator=generator, device=device)


def at_window_start(batch: ReflowBatch, mask: Tensor) -> ReflowBatch:
    """``batch`` with the samples in ``mask`` moved to their window's start along their segment:
    ``t = t_start`` and ``x_t <- x_t + (t_start - t) v = x_start``; targets and windows unchanged."""
    mask = mask.to(batch.t.device)
    t = torch.where(mask, batch.t_start, batch.t)
    x_t = batch.x_t + bcast(t - batch.t, batch.x_t) * batch.v_target
    return ReflowBatch(x_t=x_t, t=t, v_target=batch.v_target, t_start=batch.t_start, t_end=batch.t_end)


@torch.no_grad()
def teacher_start_points(teacher: StageTeacher, noise: Tensor, t_start: Tensor, cond: Cond = None,
                         uncond: Cond = None, steps: int = REFERENCE_STEPS) -> Tensor:
    """Start points made by the teacher from noise (prompt-only data): solve t = 1 -> t_start."""
    return solve(teacher.denoiser, noise, 1.0, t_start, steps, cond, uncond, teacher.guidance, teacher.windows)


@torch.no_grad()
def make_reflow_batch(x0: Tensor, noise: Tensor, windows: TimeWindows, teacher: StageTeacher,
                      schedule: VPSchedule, cond: Cond = None, uncond: Cond = None,
                      t: Tensor | None = None, generator: torch.Generator | None = None,
                      x_start: Tensor | None = None) -> ReflowBatch:
    """Build the batch for a stage with ``windows`` (see module doc).

    ``t`` defaults to :func:`sample_times`; ``x_start`` (e.g. from :func:`teacher_start_points`)
    replaces forward noising of ``x0`` when given.
    """
    x0 = x0.to(compute_dtype(x0))
    t = sample_times(x0.shape[0], generator, x0.device) if t is None else per_sample_time(t, x0)
    t = t.to(x0.dtype)
    t_start, t_end = windows.bounds(t)
    if x_start is None:
        x_start = schedule.add_noise(x0, noise.to(x0.dtype), t_start)
    x_end = solve(teacher.denoiser, x_start, t_start, t_end, teacher.steps, cond, uncond,
                  teacher.guidance, teacher.windows, teacher.solver)
    v = (x_end - x_start) / bcast(t_end - t_start, x0)
    x_t = x_start + bcast(t - t_start, x0) * v
    return ReflowBatch(x_t=x_t, t=t, v_target=v, t_start=t_start, t_end=t_end)
