"""Closed-form diffusion on Gaussian data N(mu, s^2 I): exact teacher and exact ODE flow."""

import torch

from proreflow import Denoiser, VPSchedule


def exact_eps(schedule: VPSchedule, mu: torch.Tensor, s: float):
    """``E[eps | x_t] = sqrt(1-a) (x - sqrt(a) mu) / (a s^2 + 1 - a)`` as a network(x, timestep, cond)."""

    def network(x, timestep, cond):
        t = timestep / (schedule.num_train_timesteps - 1)
        a = schedule.abar(t.to(torch.float64)).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    return network


def exact_flow(schedule: VPSchedule, mu, s, x, t_from, t_to):
    """Probability-flow ODE solution: the standardized position ``(x - sqrt(a) mu) / sigma`` is conserved."""
    a_f = schedule.abar(torch.tensor(t_from, dtype=torch.float64))
    a_t = schedule.abar(torch.tensor(t_to, dtype=torch.float64))
    sig_f, sig_t = (a_f * s**2 + 1 - a_f).sqrt(), (a_t * s**2 + 1 - a_t).sqrt()
    return a_t.sqrt() * mu + sig_t * (x - a_f.sqrt() * mu) / sig_f


def gaussian_teacher(schedule, mu, s):
    return Denoiser(exact_eps(schedule, mu, s), "epsilon", schedule)
