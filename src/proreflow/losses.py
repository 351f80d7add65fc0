"""Aligned v-prediction loss, the space its squared error is measured in, and time weights.

    L = sum_i u_i [w_i mse_i + alpha (1 - cos(v_pred_i, v_tgt_i)) + beta (|v_pred_i| - |v_tgt_i|)^2 / |v_tgt_i|^2]

with ``u_i`` optional per-sample weights normalised to sum 1 (default 1 / batch). The direction
and magnitude terms are always on velocities (per sample over all non-batch dims). The squared
error ``mse_i`` is the mean of ``(p - g)^2`` over the dims of sample ``i``, where ``(p, g)`` are
the prediction and target in a *loss space* (:func:`to_loss_space`) and ``w_i`` a per-sample
time weight (:func:`time_weights`).

Loss spaces, for a sample at ``(x_t, t)`` in the window ending at ``s`` (``a = abar``):

    velocity: p = v                       (the paper's loss)
    epsilon:  p = eps implied by v        (PeRFlow's "noise matching"), eps error = v error / c(t, s),
              c(t, s) = (sqrt(1 - a_s) - sqrt(a_s (1 - a_t) / a_t)) / (s - t)
    x0:       p = x0 implied by v,        x0 error = eps error * sqrt((1 - a_t) / a_t)
    geometric: p = v / sqrt(c(t, s)),     squared error = velocity error^2 / c = |v error| |eps error|
              (the geometric mean of the velocity and epsilon spaces' squared errors)
    capped_epsilon: p = v / min(c(t, s), c_cap): the epsilon space where c <= c_cap, the velocity
              space scaled by 1 / c_cap^2 where c is larger (the noisy start of the first windows,
              whose error the epsilon space divides by up to c^2 ~ 180)

epsilon and x0 are the outputs whose DDIM step from ``(x_t, t)`` to ``s`` is ``x_t + (s - t) v``
(:func:`~proreflow.parametrize.velocity_to_output`), so a space's error is zero exactly when
the velocity error is. Where ``abar`` is flat (``t`` and ``s`` both below ``1 / T`` on the trailing
grid), ``c = 0``: no output moves ``x_t``, and every space but velocity gives the sample 0 (no error).
Time weights (``SNR(t) = a_t / (1 - a_t)``):

    none:    w = 1
    min_snr: w = min(SNR(t), gamma) / SNR(t)      (min-SNR-gamma, Hang et al. 2023, as for an epsilon loss)
    window:  w = 1 / mean over the batch's samples of the same window of mean(g^2)
             (each window's error relative to its own target size; the mean is not differentiated)
    start_epsilon: w = c(h, 0)^2 / c(t_start, s)^2, h = t_start - s   (each window weighted as the
             epsilon space weighs its start, relative to the window of the same length that ends at
             0, which keeps w = 1; with loss_space velocity: the velocity space's profile inside a
             window, the epsilon space's balance between windows)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .flow import FlowSchedule
from .parametrize import velocity_to_output
from .schedules import VPSchedule, bcast

_EPS = 1e-12

LOSS_SPACES = ("velocity", "epsilon", "x0", "geometric", "capped_epsilon")
LOSS_WEIGHTINGS = ("none", "min_snr", "window", "start_epsilon")
FLOW_LOSS_SPACES, FLOW_LOSS_WEIGHTINGS = ("velocity",), ("none", "window")
"""What a flow-matching teacher (a :class:`~proreflow.flow.FlowSchedule`) can serve; the others need a VP schedule."""
_SPACE_OUTPUT = {"epsilon": "epsilon", "x0": "sample"}


@dataclass
class LossTerms:
    """The total loss and its (unweighted-by-alpha/beta) parts, each a scalar."""

    total: Tensor
    mse: Tensor
    direction: Tensor
    magnitude: Tensor


def _safe_norm(v: Tensor) -> Tensor:
    """Per-sample L2 norm with a finite gradient at 0."""
    sq = v.pow(2).sum(dim=1)
    return torch.where(sq > _EPS**2, sq.clamp_min(_EPS**2).sqrt(), torch.zeros_like(sq))


def _flat(x: Tensor) -> Tensor:
    return x.float().flatten(1) if x.dtype in (torch.float16, torch.bfloat16) else x.flatten(1)


def to_loss_space(v: Tensor, x_t: Tensor, t: Tensor, t_end: Tensor, space: str,
                  schedule: VPSchedule | FlowSchedule | None = None, c_cap: float = 4.0) -> Tensor:
    """Velocity ``v`` at ``(x_t, t)`` towards ``t_end`` expressed in loss space ``space`` (module doc)."""
    if space not in LOSS_SPACES:
        raise ValueError(f"unknown loss space {space!r}; use one of {', '.join(LOSS_SPACES)}")
    if space == "velocity":
        return v
    if not isinstance(schedule, VPSchedule):  # None, or a flow-matching teacher's FlowSchedule
        raise ValueError(f"the {space!r} loss space needs the teacher's VPSchedule (a VP diffusion teacher); "
                         "use loss_space: velocity")
    if space == "geometric":
        return v * _inverse(velocity_per_epsilon(t, t_end, schedule).sqrt(), v)
    if space == "capped_epsilon":
        return v * _inverse(velocity_per_epsilon(t, t_end, schedule).clamp(max=c_cap), v)
    return velocity_to_output(v, x_t, t, t_end, _SPACE_OUTPUT[space], schedule)


def _inverse(c: Tensor, like: Tensor) -> Tensor:
    """``1 / c`` per sample, shaped for ``like``; 0 where ``c = 0`` (a flat ``abar``: the module doc)."""
    c = bcast(c, like).to(like.dtype)
    return torch.where(c > 0, 1 / c.clamp_min(_EPS), torch.zeros_like(c))


def velocity_per_epsilon(t: Tensor, t_end: Tensor, schedule: VPSchedule) -> Tensor:
    """``c(t, s) = (sqrt(1 - a_s) - sqrt(a_s (1 - a_t) / a_t)) / (s - t)``: the velocity error of an
    epsilon error (module doc); > 0 where ``a_s > a_t``, 0 where ``abar`` is flat (``a_s = a_t``)."""
    a_t, a_s = schedule.abar(t), schedule.abar(t_end)
    c = ((1 - a_s).sqrt() - (a_s * (1 - a_t) / a_t).sqrt()) / (t_end - t)
    return torch.where(a_s > a_t, c.clamp_min(0), torch.zeros_like(c))  # 0 where abar is flat


def snr(t: Tensor, schedule: VPSchedule) -> Tensor:
    """``SNR(t) = abar(t) / (1 - abar(t))``."""
    a = schedule.abar(t)
    return a / (1 - a).clamp_min(_EPS)


def time_weights(weighting: str, t: Tensor, t_start: Tensor, t_end: Tensor, target: Tensor,
                 schedule: VPSchedule | FlowSchedule | None = None,
                 gamma: float = 5.0, reference: float | None = None) -> Tensor:
    """Per-sample weights ``w_i`` of the squared error (module doc); ``target`` in the loss space.

    reference: ``start_epsilon``'s window length ``h`` of weight 1 (default: each sample's own window length);
    a stage that trains several window counts gives its own, so that the counts' windows are weighed on one
    scale, the epsilon space's: ``c(h, 0)^2 / c(t_start, t_end)^2``."""
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; use one of {', '.join(LOSS_WEIGHTINGS)}")
    g = _flat(target).detach()
    if weighting == "none":
        return torch.ones(g.shape[0], dtype=g.dtype, device=g.device)
    if weighting != "window" and not isinstance(schedule, VPSchedule):
        raise ValueError(f"{weighting} weighting needs the teacher's VPSchedule (a VP diffusion teacher); "
                         "use loss_weighting: none")
    if weighting == "min_snr":
        s = snr(t, schedule).to(g)
        return s.clamp(max=gamma) / s.clamp_min(_EPS)
    if weighting == "start_epsilon":
        h = t_start - t_end if reference is None else torch.full_like(t_start, reference)
        c_start, c_last = (velocity_per_epsilon(a, b, schedule).to(g)
                           for a, b in ((t_start, t_end), (h, torch.zeros_like(h))))
        return (c_last / c_start.clamp_min(_EPS)).pow(2)
    size = g.pow(2).mean(dim=1)
    same = t_start.reshape(-1, 1) == t_start.reshape(1, -1)  # same window
    window_mean = (same.to(g) @ size) / same.sum(dim=1).to(g)
    return 1.0 / window_mean.clamp_min(_EPS)


def aligned_v_loss(v_pred: Tensor, v_target: Tensor, alpha: float = 1.0, beta: float = 0.0,
                   weights: Tensor | None = None, space_pred: Tensor | None = None,
                   space_target: Tensor | None = None, mse_weights: Tensor | None = None) -> LossTerms:
    """Aligned v-prediction loss (module doc). Zero vectors give cos = 0 and no NaN.

    ``weights``: per-sample weights ``u`` of every term (normalised to sum 1). ``space_pred`` /
    ``space_target``: the prediction and target in a loss space (:func:`to_loss_space`) for the
    squared error (default: the velocities); ``mse_weights``: time weights ``w`` of the squared
    error only, as given (not normalised: min-SNR keeps its scale against the direction term).
    """
    if v_pred.shape != v_target.shape:
        raise ValueError(f"v_pred {tuple(v_pred.shape)} and v_target {tuple(v_target.shape)} differ in shape")
    p = _flat(v_pred)
    g = v_target.to(p.dtype).flatten(1)
    sp = p if space_pred is None else _flat(space_pred).to(p.dtype)
    sg = g if space_target is None else space_target.to(p.dtype).flatten(1)
    mse = (sp - sg).pow(2).mean(dim=1)
    np_, ng = _safe_norm(p), _safe_norm(g)
    cos = (p * g).sum(dim=1) / (np_ * ng).clamp_min(_EPS)
    direction = 1 - cos
    magnitude = (np_ - ng).pow(2) / ng.pow(2).clamp_min(_EPS)
    w = torch.ones_like(mse) if weights is None else weights.to(mse)
    w = w / w.sum().clamp_min(_EPS)
    wm = w if mse_weights is None else w * mse_weights.to(mse)

    def reduce(term: Tensor, weight: Tensor = w) -> Tensor:
        return (weight * term).sum()

    terms = LossTerms(total=torch.zeros((), dtype=p.dtype, device=p.device), mse=reduce(mse, wm),
                      direction=reduce(direction), magnitude=reduce(magnitude))
    terms.total = terms.mse + (alpha * terms.direction if alpha else 0) + (beta * terms.magnitude if beta else 0)
    return terms
