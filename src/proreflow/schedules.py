"""Variance-preserving (VP) noise schedules and output conversions.

``x_t = sqrt(abar(t)) * x0 + sqrt(1 - abar(t)) * eps``. A VP teacher trained on
``T = num_train_timesteps`` discrete steps sees the continuous time ``t`` in [0, 1] (t = 1 noise,
t = 0 data) as the timestep ``tau = max(t * T - 1, 0)``: diffusers' "trailing" grid, so the window
edges ``k / W`` of any ``W`` dividing ``T`` are the integer timesteps diffusers' trailing DDIM
visits (999, 749, 499, 249 at W = 4), and t = 0 is ``alphas_cumprod[0]``, where that DDIM's last
step lands with ``set_alpha_to_one=False``. ``abar`` at a fractional ``tau`` interpolates
``alphas_cumprod`` linearly; below ``t = 1 / T`` it stays ``alphas_cumprod[0]``. The convention was
chosen by measurement (``docs/timestep-convention.md``). All schedule math runs in at least float32,
whatever dtype the networks use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

VP_TIME_CONVENTION = "trailing"
"""The name of the timestep convention (module doc), part of the keys of cached teacher work, so that
caches made under the former ``tau = t * (T - 1)`` are not read as this convention's."""

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "velocity", "flow_velocity")
DIFFUSION_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype schedule math runs in for ``x``: float64 for float64 tensors, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def make_betas(kind: str, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
               beta_end: float = 0.012) -> Tensor:
    """Betas of diffusers' DDPMScheduler ``beta_schedule`` (float64)."""
    n = num_train_timesteps
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if kind == "squaredcos_cap_v2":
        def abar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)],
                            dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {kind!r}: use scaled_linear, linear or squaredcos_cap_v2")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale ``sqrt(abar)`` so that ``abar`` at the last step is exactly 0 (Lin et al. 2023)."""
    sqrt_abar = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class VPSchedule:
    """A discrete VP schedule: ``alphas_cumprod[tau]`` for ``tau = 0..T-1``."""

    alphas_cumprod: Tensor = field(repr=False)

    @classmethod
    def from_betas(cls, kind: str = "scaled_linear", num_train_timesteps: int = 1000,
                   beta_start: float = 0.00085, beta_end: float = 0.012,
                   zero_terminal_snr: bool = False) -> VPSchedule:
        """The schedule diffusers builds for the same arguments (SD1.5 / SDXL: the defaults)."""
        betas = make_betas(kind, num_train_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(torch.cumprod(1 - betas, 0))

    @classmethod
    def from_scheduler_config(cls, config) -> VPSchedule:
        """From a diffusers scheduler config (dict or FrozenDict)."""
        if config.get("trained_betas") is not None:
            betas = torch.as_tensor(config["trained_betas"], dtype=torch.float64)
            return cls(torch.cumprod(1 - betas, 0))
        return cls.from_betas(config.get("beta_schedule", "linear"),
                              config.get("num_train_timesteps", 1000),
                              config.get("beta_start", 0.0001), config.get("beta_end", 0.02),
                              config.get("rescale_betas_zero_snr", False))

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def timestep(self, t: Tensor) -> Tensor:
        """``tau = max(t * T - 1, 0)``: the (possibly fractional) timestep the network sees (module doc)."""
        return (torch.as_tensor(t) * self.num_train_timesteps - 1).clamp(min=0)

    def time(self, timestep: Tensor) -> Tensor:
        """``t = (tau + 1) / T``: the time of a timestep, the inverse of :meth:`timestep` for tau >= 0."""
        return (torch.as_tensor(timestep) + 1) / self.num_train_timesteps

    def abar(self, t: Tensor) -> Tensor:
        """``alphas_cumprod`` at continuous t: at ``tau = timestep(t)``, linear between integer timesteps."""
        t = torch.as_tensor(t)
        dtype = compute_dtype(t)
        table = self.alphas_cumprod.to(device=t.device, dtype=torch.float64)
        tau = self.timestep(t.to(torch.float64)).clamp(max=self.num_train_timesteps - 1)
        lo = tau.floor().long().clamp(max=self.num_train_timesteps - 2)
        frac = tau - lo
        return (table[lo] * (1 - frac) + table[lo + 1] * frac).to(dtype)

    def time_of_abar(self, abar: Tensor) -> Tensor:
        """The t in ``[1 / T, 1]`` with ``abar(t) = abar`` (float64): :meth:`abar` is linear between integer
        timesteps and strictly decreasing there, so its inverse is linear between them too. Values outside
        ``[alphas_cumprod[-1], alphas_cumprod[0]]`` are clamped to it."""
        table = self.alphas_cumprod.to(dtype=torch.float64)
        a = torch.as_tensor(abar, dtype=torch.float64).to(table.device).clamp(table[-1], table[0])
        n = self.num_train_timesteps
        above = n - torch.searchsorted(table.flip(0).contiguous(), a, right=True)  # entries > a
        lo = (above - 1).clamp(0, n - 2)
        tau = lo + (table[lo] - a) / (table[lo] - table[lo + 1])
        return self.time(tau)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = sqrt(abar(t)) x0 + sqrt(1 - abar(t)) eps`` with per-sample t."""
        a = bcast(self.abar(t).to(compute_dtype(x0)), x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """Per-sample scalar ``v`` (shape ``(B,)`` or ``()``) shaped to broadcast against ``like``."""
    v = torch.as_tensor(v, device=like.device)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


def to_x0_eps(output: Tensor, x: Tensor, abar: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """Turn a diffusion model's output at ``x_t`` into its ``(x0, eps)`` estimate.

    epsilon: ``x0 = (x - sqrt(1-a) eps) / sqrt(a)``; sample: ``eps = (x - sqrt(a) x0) / sqrt(1-a)``;
    v_prediction (``v = sqrt(a) eps - sqrt(1-a) x0``): ``x0 = sqrt(a) x - sqrt(1-a) v``,
    ``eps = sqrt(1-a) x + sqrt(a) v``.
    """
    a = bcast(abar, x).to(compute_dtype(x))
    sa, s1a = a.sqrt(), (1 - a).sqrt()
    out = output.to(compute_dtype(x))
    if prediction_type == "epsilon":
        return (x - s1a * out) / sa, out
    if prediction_type == "sample":
        return out, (x - sa * out) / s1a
    if prediction_type == "v_prediction":
        return sa * x - s1a * out, s1a * x + sa * out
    raise ValueError(f"prediction type {prediction_type!r} is not a diffusion output; "
                     f"use one of {DIFFUSION_PREDICTION_TYPES}")


def from_x0_eps(x0: Tensor, eps: Tensor, abar: Tensor, prediction_type: str) -> Tensor:
    """Inverse of :func:`to_x0_eps`: the output of type ``prediction_type`` for ``(x0, eps)``."""
    a = bcast(abar, x0).to(compute_dtype(x0))
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return a.sqrt() * eps - (1 - a).sqrt() * x0
    raise ValueError(f"prediction type {prediction_type!r} is not a diffusion output; "
                     f"use one of {DIFFUSION_PREDICTION_TYPES}")


def convert_output(output: Tensor, x: Tensor, abar: Tensor, source: str, target: str) -> Tensor:
    """Convert a diffusion output between epsilon / sample / v_prediction at ``(x_t, abar)``."""
    x0, eps = to_x0_eps(output, x, abar, source)
    return from_x0_eps(x0, eps, abar, target)
