"""Flow-matching teachers against closed forms and against diffusers' FlowMatchEulerDiscreteScheduler."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from helpers.gaussian import exact_flow_path, gaussian_flow_teacher

from proreflow import (
    Denoiser,
    FlowSchedule,
    StageTeacher,
    TimeWindows,
    make_reflow_batch,
    output_to_velocity,
    sample,
    solve,
    velocity_to_output,
)

MU, S = 0.7, 0.3
SCHEDULES = [FlowSchedule(1.0), FlowSchedule(3.0), FlowSchedule(3.0, "unshifted"), FlowSchedule(0.5, "unshifted")]


def _x_at(schedule: FlowSchedule, t: float, n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x0 = MU + S * torch.randn(n, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 8, generator=g, dtype=torch.float64)
    return schedule.add_noise(x0, noise, torch.tensor(t, dtype=torch.float64))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_t_and_sigma_round_trip_and_keep_the_ends(schedule):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    sigma = schedule.sigma(t)
    torch.testing.assert_close(schedule.t_of_sigma(sigma), t, rtol=0, atol=1e-15)
    assert sigma[0] == 0 and sigma[-1] == 1 and bool((sigma.diff() > 0).all())
    # the unshifted s diffusers shifts is shift^-1(sigma), whatever the window space
    s, a = schedule.unshifted(t), schedule.shift
    torch.testing.assert_close(a * s / (1 + (a - 1) * s), sigma, rtol=0, atol=1e-15)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_slope_is_the_secant_and_the_derivative_at_zero_gap(schedule):
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    s = torch.tensor([0.6, 0.25, 0.0], dtype=torch.float64)
    secant = (schedule.sigma(s) - schedule.sigma(t)) / (s - t)
    torch.testing.assert_close(schedule.slope(t, s), secant, rtol=1e-14, atol=0)
    h = 1e-6
    torch.testing.assert_close(schedule.slope(t, t), (schedule.sigma(t + h) - schedule.sigma(t - h)) / (2 * h),
                               rtol=1e-8, atol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sigmas_equal_diffusers_static_shift(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    schedule = FlowSchedule.from_scheduler_config(scheduler.config, window_space="unshifted")
    s = torch.linspace(1, 0, 9, dtype=torch.float64)[:-1]
    scheduler.set_timesteps(sigmas=s.tolist())
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), schedule.sigma(s), rtol=0, atol=1e-6)
    torch.testing.assert_close(scheduler.timesteps.double(), schedule.timestep(s), rtol=0, atol=1e-4)
    # the teacher's training sigmas (the scheduler's init table) too
    train = FlowMatchEulerDiscreteScheduler(shift=shift)
    s_train = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    torch.testing.assert_close(train.sigmas.double(), schedule.sigma(s_train), rtol=0, atol=1e-6)
    # t := sigma places the same sigmas at t = sigma, given to diffusers as its unshifted s
    in_sigma = FlowSchedule.from_scheduler_config(scheduler.config)
    t = schedule.sigma(s)
    scheduler.set_timesteps(sigmas=in_sigma.unshifted(t).tolist())
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), in_sigma.sigma(t), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mu", [0.5, 1.15])
def test_sigmas_equal_diffusers_dynamic_shifting(mu):
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    schedule = FlowSchedule.from_scheduler_config(scheduler.config, mu=mu, window_space="unshifted")
    assert schedule.shift == pytest.approx(math.exp(mu))
    s = torch.linspace(1, 0, 7, dtype=torch.float64)[:-1]
    scheduler.set_timesteps(sigmas=s.tolist(), mu=mu)
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), schedule.sigma(s), rtol=0, atol=1e-6)


def test_dynamic_shifting_without_mu_and_unsupported_options_are_clear_errors():
    with pytest.raises(ValueError, match="pass mu"):
        FlowSchedule.from_scheduler_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowSchedule.from_scheduler_config({"use_karras_sigmas": True})
    with pytest.raises(ValueError, match="window_space"):
        FlowSchedule(3.0, "shifted")


def test_the_network_sees_sigma_times_1000():
    seen = []

    def network(x, timestep, cond):
        seen.append(timestep)
        return x

    d = Denoiser(network, "flow_velocity", FlowSchedule(3.0, "unshifted"))
    d.predict(torch.zeros(2, 1, dtype=torch.float64), torch.tensor([0.5, 0.25], dtype=torch.float64))
    torch.testing.assert_close(seen[0], torch.tensor([750.0, 500.0], dtype=torch.float64))


def test_a_flow_output_needs_a_flow_schedule():
    with pytest.raises(ValueError, match="FlowSchedule"):
        Denoiser(lambda x, t, c: x, "flow_velocity")
    with pytest.raises(ValueError, match="FlowSchedule"):
        Denoiser(lambda x, t, c: x, "velocity", FlowSchedule())


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_velocity_and_output_round_trip(schedule):
    x, u = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([1.0, 0.8, 0.5, 0.3, 0.1], dtype=torch.float64)
    s = torch.tensor([0.75, 0.8, 0.25, 0.0, 0.0], dtype=torch.float64)  # one zero-length gap
    v = output_to_velocity(u, x, t, s, "flow_velocity", schedule)
    torch.testing.assert_close(velocity_to_output(v, x, t, s, "flow_velocity", schedule), u, rtol=1e-13, atol=1e-13)
    # one Euler step in t along v lands where diffusers' Euler step in sigma lands
    step = x + (s - t).reshape(-1, 1) * v
    diffusers_step = x + (schedule.sigma(s) - schedule.sigma(t)).reshape(-1, 1) * u
    torch.testing.assert_close(step, diffusers_step, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("t_start,t_end", [(1.0, 0.75), (0.5, 0.25), (0.25, 0.0), (1.0, 0.0)])
def test_window_solve_converges_to_the_exact_flow_at_first_order(schedule, t_start, t_end):
    teacher = gaussian_flow_teacher(schedule, MU, S)
    x = _x_at(schedule, t_start)
    sig = schedule.sigma(torch.tensor([t_start, t_end], dtype=torch.float64))
    exact = exact_flow_path(MU, S, x, sig[0], sig[1])
    errors = [(solve(teacher, x, t_start, t_end, n) - exact).abs().max().item() for n in (64, 128, 256, 512)]
    assert errors[-1] < 1e-2
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(0.85 < r < 1.15 for r in rates), rates  # Euler is a first-order method


def test_flow_euler_is_exact_for_point_mass_data():
    """With s = 0 every trajectory is a straight line in sigma: one step lands on the exact flow."""
    schedule = FlowSchedule(3.0, "unshifted")
    teacher = gaussian_flow_teacher(schedule, MU, 0.0)
    x = _x_at(schedule, 0.9)
    sig = schedule.sigma(torch.tensor([0.9, 0.1], dtype=torch.float64))
    torch.testing.assert_close(solve(teacher, x, 0.9, 0.1, 1), exact_flow_path(MU, 0.0, x, sig[0], sig[1]),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_teacher_stepped_once_per_window_is_euler_over_the_window_edges_in_sigma(schedule):
    teacher = gaussian_flow_teacher(schedule, MU, S)
    noise = torch.randn(16, 8, dtype=torch.float64)
    x = noise
    sigmas = schedule.sigma(TimeWindows(4).edges())
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):  # textbook flow-matching Euler loop
        x = x + (sigma_next - sigma) * teacher.network(x, (sigma * 1000).expand(16), None)
    torch.testing.assert_close(sample(teacher, noise, TimeWindows(4), 4), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_reflow_batch_of_a_flow_teacher_is_the_segment_to_its_euler_landing(schedule):
    teacher = gaussian_flow_teacher(schedule, MU, S)
    g = torch.Generator().manual_seed(3)
    x0 = MU + S * torch.randn(6, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1.0, 0.9, 0.6, 0.5, 0.3, 0.01], dtype=torch.float64)
    windows = TimeWindows(2)
    batch = make_reflow_batch(x0, noise, windows, StageTeacher(teacher, steps=1), schedule, t=t)
    t_start, t_end = windows.bounds(t)
    sig_s, sig_e = schedule.sigma(t_start).reshape(-1, 1), schedule.sigma(t_end).reshape(-1, 1)
    x_start = (1 - sig_s) * x0 + sig_s * noise
    x_end = x_start + (sig_e - sig_s) * teacher.network(x_start, sig_s.reshape(-1) * 1000, None)
    v = (x_end - x_start) / (t_end - t_start).reshape(-1, 1)
    torch.testing.assert_close(batch.v_target, v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(batch.x_t, x_start + (t - t_start).reshape(-1, 1) * v, rtol=1e-12, atol=1e-12)
    # a student that learned this target exactly, stepped once per window, lands on the teacher's landing
    torch.testing.assert_close(batch.x_t + (t_end - t).reshape(-1, 1) * batch.v_target, x_end, rtol=1e-12, atol=1e-12)
