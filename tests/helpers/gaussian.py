"""Closed-form diffusion on Gaussian data N(mu, s^2 I): exact teacher and exact ODE flow."""

import torch

from proreflow import Denoiser, VPSchedule


def exact_eps(schedule: VPSchedule, mu: torch.Tensor, s: float):
    """``E[eps | x_t] = sqrt(1-a) (x - sqrt(a) mu) / (a s^2 + 1 - a)`` as a network(x, timestep, cond)."""

    def network(x, timestep, cond):
        t = schedule.time(timestep)
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


def flow_moments(mu, s, sigma):
    """Mean ``(1 - sigma) mu`` and variance ``(1 - sigma)^2 s^2 + sigma^2`` of ``x_sigma`` (rectified-flow path)."""
    return (1 - sigma) * mu, (1 - sigma) ** 2 * s**2 + sigma**2


def exact_flow_velocity(schedule, mu, s):
    """``E[eps - x0 | x_sigma] = (sigma - (1 - sigma) s^2) / V (x - (1 - sigma) mu) - mu`` as a network;
    the timestep it sees is ``sigma * num_train_timesteps``."""

    def network(x, timestep, cond):
        sigma = (timestep.to(torch.float64) / schedule.num_train_timesteps).reshape(-1, *([1] * (x.ndim - 1)))
        mean, var = flow_moments(mu, s, sigma)
        return ((sigma - (1 - sigma) * s**2) / var * (x - mean) - mu).to(x.dtype)

    return network


def exact_flow_path(mu, s, x, sigma_from, sigma_to):
    """Flow-matching ODE solution in sigma: ``(x - (1 - sigma) mu) / sqrt(V)`` is conserved."""
    (m_f, v_f), (m_t, v_t) = flow_moments(mu, s, sigma_from), flow_moments(mu, s, sigma_to)
    return m_t + (v_t / v_f) ** 0.5 * (x - m_f)


def gaussian_flow_teacher(schedule, mu, s):
    return Denoiser(exact_flow_velocity(schedule, mu, s), "flow_velocity", schedule)
