"""Flow-matching teachers: the rectified-flow path and the map between our ``t`` and their sigma.

A flow-matching teacher (Stable Diffusion 3, FLUX, SANA; diffusers' ``FlowMatchEulerDiscreteScheduler``)
lives on the straight path

    x_sigma = (1 - sigma) x0 + sigma eps,          sigma in [0, 1], sigma = 1 noise,

its network predicts ``u = eps - x0 = dx/dsigma`` (prediction type ``"flow_velocity"``) and sees
the timestep ``sigma * num_train_timesteps``. diffusers samples on a grid uniform in an unshifted
``s`` and shifts it,

    sigma = shift s / (1 + (shift - 1) s)                       (static ``shift``; SD3: 3.0)
    sigma = e^mu / (e^mu + (1 / s - 1))                          (dynamic shifting, exponential)

which are one map with ``shift = e^mu``. Our time ``t`` (in [0, 1], t = 1 noise, as the whole core)
is mapped to sigma in one of two ways (``window_space``), which decides where windows fall:

- ``"sigma"`` (default, the simpler): ``t := sigma``; windows are uniform in the teacher's sigma.
- ``"unshifted"``: ``t := s``, ``sigma = shift(t)``; windows are uniform in diffusers' unshifted
  ``s``, i.e. spaced as the teacher's own Euler sampler spaces its steps.

Measured on the built-in flow teachers (``docs/research/2026-quality-study.md``, "Where windows fall"):
``sigma`` distils better on moons at every step count and on digits at 4 and 1 steps (``unshifted`` at
shift 3 wins digits' 2 steps), so it is the default; those teachers were trained with sigma uniform, and an
SD3-class teacher (logit-normal sigma, shift 3) is not measured.

Like DDIM for a VP teacher (:mod:`proreflow.parametrize`), a flow output becomes the velocity of the
straight segment to a target time ``s``: from ``x0 = x - sigma u``, ``eps = x + (1 - sigma) u`` the
landing on the path at ``sigma(s)`` is ``x + (sigma(s) - sigma(t)) u``, so

    v = (sigma(s) - sigma(t)) / (s - t) * u,

and one Euler step in ``t`` to ``s`` is exactly one diffusers Euler step from ``sigma(t)`` to
``sigma(s)``, whatever the shift (at ``s = t`` the slope is ``dsigma/dt``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .schedules import bcast, compute_dtype

FLOW_PREDICTION_TYPE = "flow_velocity"
WINDOW_SPACES = ("sigma", "unshifted")


def shift_sigma(s: Tensor, shift: float) -> Tensor:
    """``sigma = shift s / (1 + (shift - 1) s)`` (diffusers' static shift; dynamic: ``shift = e^mu``)."""
    return shift * s / (1 + (shift - 1) * s)


def unshift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """Inverse of :func:`shift_sigma`: ``s = sigma / (shift - (shift - 1) sigma)``."""
    return sigma / (shift - (shift - 1) * sigma)


def shift_slope(t: Tensor, s: Tensor, shift: float) -> Tensor:
    """``(shift_sigma(s) - shift_sigma(t)) / (s - t) = shift / ((1 + (shift-1) t)(1 + (shift-1) s))``;
    at ``s = t`` the derivative, so a zero-length gap needs no special case."""
    return shift / ((1 + (shift - 1) * t) * (1 + (shift - 1) * s))


@dataclass(frozen=True)
class FlowSchedule:
    """A flow-matching teacher's sigma as a function of our ``t`` (module doc).

    shift: diffusers' ``shift``, or ``e^mu`` under dynamic shifting.
    window_space: ``"sigma"`` (t = sigma) or ``"unshifted"`` (t = diffusers' unshifted s).
    num_train_timesteps: the network sees ``timestep = sigma * num_train_timesteps``.
    """

    shift: float = 1.0
    window_space: str = "sigma"
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if not self.shift > 0:
            raise ValueError(f"a flow schedule's shift must be positive, got {self.shift!r}")
        if self.window_space not in WINDOW_SPACES:
            raise ValueError(f"unknown window_space {self.window_space!r}; use one of {WINDOW_SPACES}")

    @classmethod
    def from_scheduler_config(cls, config, mu: float | None = None, window_space: str = "sigma") -> FlowSchedule:
        """From a ``FlowMatchEulerDiscreteScheduler`` config (dict or FrozenDict); ``mu`` is required
        under ``use_dynamic_shifting`` (the pipeline computes it from the image size)."""
        for key in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                    "invert_sigmas", "stochastic_sampling"):
            if config.get(key):
                raise ValueError(f"the teacher's scheduler sets {key}: proreflow supports the plain shifted "
                                 "flow-matching Euler schedule; unset it in the scheduler config")
        n = config.get("num_train_timesteps", 1000)
        if not config.get("use_dynamic_shifting", False):
            return cls(float(config.get("shift", 1.0)), window_space, n)
        if mu is None:
            raise ValueError("the teacher's scheduler uses dynamic shifting: pass mu (the pipeline's "
                             "calculate_shift of the image sequence length)")
        if config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError("only exponential dynamic shifting is supported (time_shift_type='exponential')")
        return cls(math.exp(mu), window_space, n)

    @property
    def t_shift(self) -> float:
        """The shift between ``t`` and sigma: ``shift`` for ``"unshifted"``, 1 for ``"sigma"``."""
        return self.shift if self.window_space == "unshifted" else 1.0

    def sigma(self, t: Tensor) -> Tensor:
        """The teacher's sigma at our ``t``."""
        return shift_sigma(torch.as_tensor(t), self.t_shift)

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        """Our ``t`` at the teacher's sigma (inverse of :meth:`sigma`)."""
        return unshift_sigma(torch.as_tensor(sigma), self.t_shift)

    def unshifted(self, t: Tensor) -> Tensor:
        """diffusers' unshifted ``s`` at our ``t``: the custom ``sigmas`` to give ``set_timesteps``."""
        return unshift_sigma(self.sigma(t), self.shift)

    def slope(self, t: Tensor, s: Tensor) -> Tensor:
        """``(sigma(s) - sigma(t)) / (s - t)`` (``dsigma/dt`` at ``s = t``)."""
        return shift_slope(torch.as_tensor(t), torch.as_tensor(s), self.t_shift)

    def timestep(self, t: Tensor) -> Tensor:
        """``sigma(t) * num_train_timesteps``: the timestep the network sees."""
        return self.sigma(t) * self.num_train_timesteps

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x = (1 - sigma(t)) x0 + sigma(t) eps`` with per-sample t."""
        sigma = bcast(self.sigma(torch.as_tensor(t, device=x0.device).to(compute_dtype(x0))), x0)
        return (1 - sigma) * x0 + sigma * noise


def flow_to_velocity(output: Tensor, x: Tensor, t: Tensor, t_target: Tensor, schedule: FlowSchedule) -> Tensor:
    """``v = (sigma(s) - sigma(t)) / (s - t) * u``: a flow output as the velocity towards ``s`` in t."""
    dtype = compute_dtype(x)
    slope = schedule.slope(bcast(t, x).to(dtype), bcast(t_target, x).to(dtype))
    return slope * output.to(dtype)


def velocity_to_flow(velocity: Tensor, x: Tensor, t: Tensor, t_target: Tensor, schedule: FlowSchedule) -> Tensor:
    """Inverse of :func:`flow_to_velocity`: ``u = v (s - t) / (sigma(s) - sigma(t))``."""
    dtype = compute_dtype(x)
    slope = schedule.slope(bcast(t, x).to(dtype), bcast(t_target, x).to(dtype))
    return velocity.to(dtype) / slope
