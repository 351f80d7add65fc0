"""ODE solvers inside a window: DDIM for diffusion teachers, Euler for velocity models, and two
second-order teacher solvers (DPM-Solver++(2M), Heun).

Both are one loop: on a uniform grid ``t_start = s_0 > s_1 > ... > s_S = t_end`` take
``x <- x + (s_{j+1} - s_j) * v`` with ``v = denoiser.velocity(x, s_j, target_j)``. With
``target_j = s_{j+1}`` a diffusion denoiser's velocity makes each step exactly a DDIM step
(:mod:`proreflow.parametrize`); a velocity denoiser gives Euler. With ``windows`` given,
``target_j`` is the end of the window holding the step: the piecewise-straight sampling of
a student (used by :func:`proreflow.sampling.sample` and by a student acting as teacher).

The grid is built once (:func:`solve_grid` here, ``TimeWindows.time_grid`` for sampling, both
from :func:`~proreflow.windows.uniform_times`) and passed to the one loop, :func:`euler_steps`.

A window solve of the original teacher may pick a higher-order method (``solve(..., solver=...)``,
:data:`SOLVERS`): ``"dpmpp_2m"`` (:func:`dpmpp_2m_steps`, one evaluation per step, diffusion teachers
only, on the window's grid uniform in log-SNR, :func:`log_snr_grid`) or ``"heun"`` (:func:`heun_steps`,
two evaluations per step, on the same uniform grid). Both are second order; DDIM / Euler is first order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch
from torch import Tensor

from .conditioning import Cond
from .parametrize import ddim_step
from .schedules import VPSchedule, bcast, compute_dtype, to_x0_eps
from .teachers import Denoiser
from .windows import TimeWindows, uniform_times

REFERENCE_STEPS = 32
"""DDIM steps that stand for the teacher's exact ODE over t in [0, 1]: the reference of fidelity and
of the evaluation suites, the trajectory plots and prompt-only data, and the original teacher's default
solver steps (``32 // windows`` per window, so that every stage of a progressive recipe steps on one grid)."""


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


def log_snr_grid(t_start, t_end, steps: int, like: Tensor, schedule: VPSchedule) -> Tensor:
    """:func:`solve_grid`'s rows with the inner times uniform in ``lambda = log_snr(abar(t))`` between the
    ends (DPM-Solver's spacing, Lu et al. 2022), so every step has the same ``h``; where an end has
    ``abar = 0`` (zero terminal SNR, ``lambda = -inf``) the times stay uniform in t.

    DPM-Solver++(2M) steps with this grid: with uniform t, ``lambda`` grows fastest near t = 0, the step
    ratio ``r = h_prev / h`` of the last steps is small and the correction ``1 / (2 r)`` amplifies the
    error. On the closed-form Gaussian teacher, [0.5, 0] in 4 steps: 3.4e-2 uniform in t, 2.0e-3 here."""
    grid = solve_grid(t_start, t_end, steps, like)
    s = torch.cat([grid[:, 0], grid[-1:, 1]])  # (steps + 1, B), the ends exact
    lam = [log_snr(schedule.abar(s[i].to(torch.float64))) for i in (0, -1)]
    share = torch.arange(1, steps, dtype=torch.float64, device=s.device).reshape(-1, 1) / steps
    inner = schedule.time_of_abar(torch.sigmoid(2 * (lam[0] + (lam[1] - lam[0]) * share)))  # abar = sigmoid(2 lambda)
    inner = torch.minimum(torch.maximum(inner, s[-1].to(inner.dtype)), s[0].to(inner.dtype))  # inside the solve
    finite = torch.isfinite(lam[0]) & torch.isfinite(lam[1])
    s[1:-1] = torch.where(finite, inner.to(s.dtype), s[1:-1])
    return torch.stack([s[:-1], s[1:], s[1:]], dim=1)


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


SOLVERS = ("ddim", "dpmpp_2m", "heun")
"""Window solvers of :func:`solve`: "ddim" (Euler for a velocity teacher; 1 evaluation per step),
"dpmpp_2m" (1 per step, diffusion teachers), "heun" (2 per step). A guided evaluation is 2
network evaluations (conditional and unconditional halves of one batch)."""

EVALS_PER_STEP = {"ddim": 1, "dpmpp_2m": 1, "heun": 2}

SOLVER_GRID = {"ddim": "uniform-t", "dpmpp_2m": "log-snr", "heun": "uniform-t"}
"""The grid each solver steps on inside a window; stored results of a solver name its grid when it is not
uniform in t (:func:`solver_key`), so results of an earlier grid are not read as this one's."""


def solver_key(solver: str) -> str:
    """``solver``, or ``solver@grid`` when it does not step uniformly in t (cache keys)."""
    grid = SOLVER_GRID[solver]
    return solver if grid == "uniform-t" else f"{solver}@{grid}"


def x0_eps(denoiser: Denoiser, x: Tensor, t: Tensor, cond: Cond = None, uncond: Cond = None,
           guidance: float = 1.0) -> tuple[Tensor, Tensor]:
    """A diffusion denoiser's ``(x0, eps)`` estimate at ``(x, t)`` (guided when asked)."""
    _check_diffusion(denoiser)
    out = denoiser.predict(x, t, cond, uncond, guidance)
    return to_x0_eps(out, x, denoiser.schedule.abar(t), denoiser.prediction_type)


def _check_diffusion(denoiser: Denoiser) -> None:
    if denoiser.schedule is None or denoiser.prediction_type == "velocity":
        raise ValueError(f"a {denoiser.prediction_type!r} denoiser has no (x0, eps) estimate; "
                         "use solver 'ddim' (Euler) or 'heun' for a velocity teacher")


def log_snr(abar: Tensor) -> Tensor:
    """``lambda = log(sqrt(abar) / sqrt(1 - abar))``, the half log signal-to-noise ratio."""
    return 0.5 * (torch.log(abar) - torch.log1p(-abar))


def dpmpp_2m_data(x0: Tensor, x0_prev: Tensor | None, h: Tensor, h_prev: Tensor | None) -> Tensor:
    """The data estimate DPM-Solver++(2M) steps with: with ``r = h_prev / h``,

        D = (1 + 1 / (2 r)) x0_i - 1 / (2 r) x0_{i-1},

    ``h = lambda_{i+1} - lambda_i``; the first step (no history), and a step after one of length 0
    (both ends below t = 1 / T, where ``abar`` is flat: :mod:`proreflow.schedules`), use ``D = x0_i`` (DDIM)."""
    if x0_prev is None:
        return x0
    c = bcast(torch.where(h_prev != 0, h / (2 * h_prev), torch.zeros_like(h)), x0).to(x0.dtype)
    return (1 + c) * x0 - c * x0_prev


def ddim_from_data(x: Tensor, data: Tensor, abar: Tensor, abar_next: Tensor) -> Tensor:
    """The exponential-integrator step with data estimate ``D``:

        x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} (1 - exp(-h)) D
                = alpha_{i+1} D + sigma_{i+1} (x_i - alpha_i D) / sigma_i,

    ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``: a DDIM step whose ``x0`` is ``D``."""
    a = bcast(abar, x).to(x.dtype)
    return ddim_step(data, (x - a.sqrt() * data) / (1 - a).sqrt(), abar_next)


def dpmpp_2m_steps(denoiser: Denoiser, x: Tensor, grid, cond: Cond = None, uncond: Cond = None,
                   guidance: float = 1.0) -> Iterator[Tensor]:
    """Yield ``x`` after each DPM-Solver++(2M) step (Lu et al. 2022, data prediction, multistep)
    along ``grid``'s rows ``(t, t_next, _)``: :func:`ddim_from_data` with :func:`dpmpp_2m_data`,
    ``lambda`` = :func:`log_snr`. One evaluation per step; second order."""
    _check_diffusion(denoiser)
    schedule = denoiser.schedule
    x = x.to(compute_dtype(x))
    x0_prev = h_prev = None
    for row in grid:
        s, s_next, _ = (per_sample_time(v, x) for v in row)
        a, a_next = schedule.abar(s).to(x.dtype), schedule.abar(s_next).to(x.dtype)
        x0, _ = x0_eps(denoiser, x, s, cond, uncond, guidance)
        h = log_snr(a_next) - log_snr(a)
        x = ddim_from_data(x, dpmpp_2m_data(x0, x0_prev, h, h_prev), a, a_next)
        x0_prev, h_prev = x0, h
        yield x


def heun_steps(denoiser: Denoiser, x: Tensor, grid, cond: Cond = None, uncond: Cond = None,
               guidance: float = 1.0) -> Iterator[Tensor]:
    """Yield ``x`` after each Heun step along ``grid``'s rows ``(t, t_next, _)``; two evaluations per
    step, second order.

    Velocity teacher, in t: ``x' = x + dt v(x, t)``, ``x_next = x + dt (v(x, t) + v(x', t_next)) / 2``.
    Diffusion teacher, in ``y = x / alpha`` and ``rho = sigma / alpha`` (where the PF-ODE is
    ``dy/drho = eps(x)`` and DDIM is its Euler step, as in Karras et al. 2022): ``x'`` = the DDIM
    step with ``eps_1 = eps(x, t)``, then the DDIM step from ``x`` with ``(eps_1 + eps(x', t_next)) / 2``."""
    x = x.to(compute_dtype(x))
    for row in grid:
        s, s_next, _ = (per_sample_time(v, x) for v in row)
        if denoiser.prediction_type == "velocity":
            dt = bcast(s_next - s, x)
            v = denoiser.velocity(x, s, s_next, cond, uncond, guidance)
            v_next = denoiser.velocity(x + dt * v, s_next, s_next, cond, uncond, guidance)
            x = x + dt * (v + v_next) / 2
        else:
            a, a_next = denoiser.schedule.abar(s).to(x.dtype), denoiser.schedule.abar(s_next).to(x.dtype)
            x0, eps = x0_eps(denoiser, x, s, cond, uncond, guidance)
            _, eps_next = x0_eps(denoiser, ddim_step(x0, eps, a_next), s_next, cond, uncond, guidance)
            eps = (eps + eps_next) / 2
            a_b = bcast(a, x)
            x = ddim_step((x - (1 - a_b).sqrt() * eps) / a_b.sqrt(), eps, a_next)
        yield x


def solve(denoiser: Denoiser, x: Tensor, t_start, t_end, steps: int, cond: Cond = None,
          uncond: Cond = None, guidance: float = 1.0, windows: TimeWindows | None = None,
          solver: str = "ddim") -> Tensor:
    """Solve the denoiser's ODE from ``t_start`` to ``t_end`` in ``steps`` steps of ``solver``
    (:data:`SOLVERS`; see module doc). A piecewise-straight student (``windows``) takes Euler steps, a
    step-conditioned one at ``windows.count`` unless it was given a count."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if windows is not None and solver != "ddim":
        raise ValueError(f"solver {solver!r} is for the original teacher; a piecewise-straight "
                         "student crosses its windows with Euler steps (solver 'ddim')")
    if windows is not None and denoiser.step_counts and denoiser.count is None:
        denoiser = denoiser.at_windows(windows.count)
    if solver == "dpmpp_2m":
        _check_diffusion(denoiser)
        grid = log_snr_grid(t_start, t_end, steps, x, denoiser.schedule)
    else:
        grid = solve_grid(t_start, t_end, steps, x, windows)
    step = {"ddim": euler_steps, "dpmpp_2m": dpmpp_2m_steps, "heun": heun_steps}[solver]
    return deque(step(denoiser, x, grid, cond, uncond, guidance), maxlen=1)[0]
