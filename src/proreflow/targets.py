"""Reflow training targets: the straight segment from a window's start to the teacher's landing.

For a time ``t`` in window ``(t_start, t_end)``:

    x_start = sqrt(abar(t_start)) x0 + sqrt(1 - abar(t_start)) eps      (forward noising)
              (a flow-matching teacher: (1 - sigma(t_start)) x0 + sigma(t_start) eps)
    x_end   = teacher ODE solve from (x_start, t_start) to t_end
    v       = (x_end - x_start) / (t_end - t_start)
    x_t     = x_start + (t - t_start) v

The student learns ``v`` at ``(x_t, t)``.

Teacher start points (stage ``start_points: teacher``): both ends lie on the original teacher's
trajectory from noise, solved window by window through the edges ``e_0 = 1 > ... > e_K = 0`` of
``K`` fine windows (:func:`teacher_trajectory`):

    x(e_0) = eps,  x(e_{i+1}) = solve(x(e_i), e_i, e_{i+1}, S_f steps)
    (x_start, x_end) = (x(e_{r i}), x(e_{r (i + 1)}))   for window i of k = K / r windows

Windows nest, so one trajectory serves every k dividing K. For a one-step solver (DDIM / Euler, Heun)
the pair of a coarse window *is* the teacher's solve over it from ``x_start`` with ``r S_f`` steps:
the chained fine solves step on the same uniform grid (``tests/test_targets.py``). A multistep
solver (DPM-Solver++(2M)) restarts its history at every edge, so it has no such pair.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from .conditioning import Cond, map_cond
from .schedules import VPSchedule, bcast, compute_dtype
from .solvers import per_sample_time, solve
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
def teacher_trajectory(teacher: StageTeacher, noise: Tensor, edges: TimeWindows, steps: int, cond: Cond = None,
                       uncond: Cond = None, last: Tensor | None = None) -> Tensor:
    """The original teacher's states at the ``K + 1`` edges of ``edges`` on its solve from ``noise`` at t = 1
    (module doc), ``steps`` steps of ``teacher.solver`` per window: shape ``(K + 1, B, *noise.shape[1:])``.

    last: per-sample index of the last edge needed; a sample stops there (its later states are NaN), so
    it costs ``last * steps`` solver steps. Default: every edge."""
    if teacher.windows is not None:
        raise ValueError("a trajectory from noise is the original teacher's; a previous-stage student has none")
    x = noise.to(compute_dtype(noise))
    n, count = x.shape[0], edges.count
    last = torch.full((n,), count) if last is None else torch.as_tensor(last).reshape(n)
    last = last.to(x.device)
    states = torch.full((count + 1, *x.shape), float("nan"), dtype=x.dtype, device=x.device)
    states[0] = x
    e = edges.edges(torch.float64).tolist()
    for i in range(count):
        active = last > i
        if not bool(active.any()):
            break
        if bool(active.all()):
            rows, c, u = x.new_ones(n, dtype=torch.bool), cond, uncond
        else:
            rows, c, u = active, _rows(cond, active, n), _rows(uncond, active, n)
        states[i + 1, rows] = solve(teacher.denoiser, states[i, rows], e[i], e[i + 1], steps, c, u,
                                    teacher.guidance, None, teacher.solver)
    return states


def _rows(cond: Cond, mask: Tensor, n: int) -> Cond:
    """The rows ``mask`` of each leaf with ``n`` rows (leaves of batch size 1 are shared)."""
    return map_cond(lambda a: a[mask.to(a.device)] if a.shape[0] == n else a, cond)


def reflow_batch(x_start: Tensor, x_end: Tensor, t: Tensor, windows: TimeWindows) -> ReflowBatch:
    """The batch of the straight segments from ``x_start`` to ``x_end`` over the windows holding ``t``:
    ``v = (x_end - x_start) / (t_end - t_start)``, ``x_t = x_start + (t - t_start) v``."""
    t = t.to(x_start.dtype)
    t_start, t_end = windows.bounds(t)
    v = (x_end - x_start) / bcast(t_end - t_start, x_start)
    x_t = x_start + bcast(t - t_start, x_start) * v
    return ReflowBatch(x_t=x_t, t=t, v_target=v, t_start=t_start, t_end=t_end)


@torch.no_grad()
def make_reflow_batch(x0: Tensor, noise: Tensor, windows: TimeWindows, teacher: StageTeacher,
                      schedule: VPSchedule, cond: Cond = None, uncond: Cond = None,
                      t: Tensor | None = None, generator: torch.Generator | None = None) -> ReflowBatch:
    """Build the batch for a stage with ``windows`` from forward-noised data (module doc); ``t`` defaults
    to :func:`sample_times`."""
    x0 = x0.to(compute_dtype(x0))
    t = sample_times(x0.shape[0], generator, x0.device) if t is None else per_sample_time(t, x0)
    t = t.to(x0.dtype)
    t_start, t_end = windows.bounds(t)
    x_start = schedule.add_noise(x0, noise.to(x0.dtype), t_start)
    x_end = solve(teacher.denoiser, x_start, t_start, t_end, teacher.steps, cond, uncond,
                  teacher.guidance, teacher.windows, teacher.solver)
    return reflow_batch(x_start, x_end, t, windows)


@torch.no_grad()
def make_trajectory_batch(noise: Tensor, windows: TimeWindows, teacher: StageTeacher, edges: TimeWindows,
                          steps: int, t: Tensor, cond: Cond = None, uncond: Cond = None) -> ReflowBatch:
    """The batch for a stage with ``windows`` from teacher start points (module doc): each sample's
    :func:`teacher_trajectory` through ``edges`` (``steps`` per fine window) up to its window's end."""
    t = per_sample_time(t, noise)
    first, last = windows.edge_indices(t, edges)
    states = teacher_trajectory(teacher, noise, edges, steps, cond, uncond, last=last)
    rows = torch.arange(noise.shape[0], device=states.device)
    return reflow_batch(states[first.to(rows.device), rows], states[last.to(rows.device), rows], t, windows)


@torch.no_grad()
def make_mixed_reflow_batch(x0: Tensor, noise: Tensor, counts: Tensor, windows: TimeWindows, teacher: StageTeacher,
                            schedule: VPSchedule, cond: Cond = None, uncond: Cond = None,
                            t: Tensor | None = None, extra_teacher: StageTeacher | None = None) -> ReflowBatch:
    """:func:`make_reflow_batch` with each sample in its own window count ``counts[i]`` (dividing
    ``windows.count``): the samples of count ``k`` cross their windows in ``teacher.steps * windows.count / k``
    steps, on the grid of the stage's own windows. ``extra_teacher``: the teacher of the counts below
    ``windows.count`` (its own ``steps`` per window of the stage; default ``teacher``)."""
    n = x0.shape[0]
    t = sample_times(n, device=x0.device) if t is None else per_sample_time(t, x0)
    counts = counts.to(x0.device)
    parts: dict[str, Tensor] = {}
    for k in sorted(set(counts.tolist()), reverse=True):
        if windows.count % k:
            raise ValueError(f"{k} windows do not nest in the stage's {windows.count}")
        rows = counts == k
        own = teacher if k == windows.count or extra_teacher is None else extra_teacher
        crossing = dataclasses.replace(own, steps=own.steps * windows.count // k)
        part = make_reflow_batch(x0[rows], noise[rows], TimeWindows(k), crossing, schedule, _rows(cond, rows, n),
                                 _rows(uncond, rows, n), t=t[rows])
        for name in ("x_t", "t", "v_target", "t_start", "t_end"):
            value = getattr(part, name)
            if name not in parts:
                parts[name] = value.new_zeros((n, *value.shape[1:]))
            parts[name][rows] = value
    return ReflowBatch(**parts)
