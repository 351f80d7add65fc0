"""Model output <-> velocity of the straight segment it implies.

A diffusion output (epsilon, v_prediction or sample) at ``(x_t, t)`` gives an estimate
``(x0, eps)``; a DDIM step to a target time ``s`` lands at
``x_s = sqrt(abar(s)) x0 + sqrt(1 - abar(s)) eps``. The velocity of the straight segment is

    v = (x_s - x_t) / (s - t),

so one Euler step ``x_t + (s - t) v`` *is* that DDIM step. With ``s`` the end of the window
holding ``t``, this is the epsilon parametrization of a ProReflow student: a student equal to
its diffusion teacher, stepped once per window, reproduces one teacher DDIM step per window.
A ``velocity`` output is the velocity itself (students from scratch). A ``flow_velocity`` output
(a flow-matching teacher's ``dx/dsigma``) is turned by the same rule in :mod:`proreflow.flow`.

The student's parametrization (recipe ``student_prediction``) is the type its network's output is
read as. A student copied from its teacher keeps the teacher's type: reading the same network as
another type is another function, which would not start as the teacher's DDIM, and a fixed
re-expression (epsilon output converted to x0 or v by the formulas here) composes an invertible
map of ``(x_t, output)`` with the same network, so the student and its gradients are unchanged:
for a copied student only the loss space (:mod:`proreflow.losses`) is a choice. A student from
scratch may output ``velocity`` (``v = output``), ``epsilon``, ``v_prediction`` or ``sample``
(``v`` = the DDIM segment above), which changes what a network smooth in ``t`` can express: an
epsilon output must jump at an inner window edge to keep ``v`` piecewise straight, and an error
``de`` in it reaches the 1-step sample as ``sqrt(1 - abar) / sqrt(abar) de`` (~14.6 at t = 1).
"""

from __future__ import annotations

from torch import Tensor

from .flow import FLOW_PREDICTION_TYPE, FlowSchedule, flow_to_velocity, velocity_to_flow
from .schedules import VPSchedule, bcast, compute_dtype, from_x0_eps, to_x0_eps


def ddim_step(x0: Tensor, eps: Tensor, abar_next: Tensor) -> Tensor:
    """``x_s = sqrt(abar(s)) x0 + sqrt(1 - abar(s)) eps`` (deterministic DDIM, eta = 0)."""
    a = bcast(abar_next, x0).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def _gap(t: Tensor, t_target: Tensor, x: Tensor) -> Tensor:
    """``s - t`` per sample, shaped for ``x``; zero-length gaps become 1 (their step is empty)."""
    dtype = compute_dtype(x)
    dt = bcast(t_target, x).to(dtype) - bcast(t, x).to(dtype)
    return dt.masked_fill(dt == 0, 1.0)


def output_to_velocity(output: Tensor, x: Tensor, t: Tensor, t_target: Tensor,
                       prediction_type: str, schedule: VPSchedule | FlowSchedule | None = None) -> Tensor:
    """Velocity ``(x_s - x_t) / (s - t)`` of the segment from ``(x_t, t)`` to the DDIM landing at ``s``."""
    if prediction_type == "velocity":
        return output.to(compute_dtype(x))
    if prediction_type == FLOW_PREDICTION_TYPE:
        return flow_to_velocity(output, x, t, t_target, _flow_schedule(schedule))
    if schedule is None:
        raise ValueError(f"a {prediction_type!r} output needs the teacher's VPSchedule to become a velocity")
    x = x.to(compute_dtype(x))
    x0, eps = to_x0_eps(output, x, schedule.abar(t), prediction_type)
    return (ddim_step(x0, eps, schedule.abar(t_target)) - x) / _gap(t, t_target, x)


def velocity_to_output(velocity: Tensor, x: Tensor, t: Tensor, t_target: Tensor,
                       prediction_type: str, schedule: VPSchedule | FlowSchedule | None = None) -> Tensor:
    """Inverse of :func:`output_to_velocity`: the output whose DDIM step to ``s`` is ``x + (s - t) v``.

    Solves ``x_t = sqrt(a_t) x0 + sqrt(1-a_t) eps`` and ``x_s = sqrt(a_s) x0 + sqrt(1-a_s) eps``
    for ``(x0, eps)``. Where ``a_s = a_t`` (both times below ``1 / T``, where ``abar`` is flat:
    :mod:`proreflow.schedules`) every output gives the same empty step; the output returned there
    is 0, with a zero gradient.
    """
    if prediction_type == "velocity":
        return velocity
    if prediction_type == FLOW_PREDICTION_TYPE:
        return velocity_to_flow(velocity, x, t, t_target, _flow_schedule(schedule))
    if schedule is None:
        raise ValueError(f"a {prediction_type!r} output needs the teacher's VPSchedule")
    x = x.to(compute_dtype(x))
    a_t, a_s = schedule.abar(t), schedule.abar(t_target)
    x_s = x + _gap(t, t_target, x) * velocity.to(x.dtype)
    st, s1t = bcast(a_t, x).sqrt(), bcast(1 - a_t, x).sqrt()
    ss, s1s = bcast(a_s, x).sqrt(), bcast(1 - a_s, x).sqrt()
    det = st * s1s - s1t * ss
    flat = det == 0
    det = det.masked_fill(flat, 1.0)
    x0 = ((x * s1s - x_s * s1t) / det).masked_fill(flat, 0.0)
    eps = ((st * x_s - ss * x) / det).masked_fill(flat, 0.0)
    return from_x0_eps(x0, eps, a_t, prediction_type)


def _flow_schedule(schedule) -> FlowSchedule:
    if not isinstance(schedule, FlowSchedule):
        raise ValueError(f"a {FLOW_PREDICTION_TYPE!r} output needs the teacher's FlowSchedule, got {schedule!r}")
    return schedule
