"""DDIM / Euler inside a window against closed forms."""

import math

import pytest
import torch
from helpers.gaussian import exact_eps, exact_flow, gaussian_teacher

from proreflow import Denoiser, TimeWindows, VPSchedule, sample, solve, to_x0_eps

SCHEDULE = VPSchedule.from_betas()
MU, S = 0.7, 0.3


def _x_at(t: float, n: int = 64) -> torch.Tensor:
    a = SCHEDULE.abar(torch.tensor(t, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    x0 = MU + S * torch.randn(n, 8, generator=g, dtype=torch.float64)
    return a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(n, 8, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("t_start,t_end", [(1.0, 0.75), (0.5, 0.25), (0.25, 0.0), (1.0, 0.0)])
def test_ddim_converges_to_the_probability_flow_solution_at_first_order(t_start, t_end):
    teacher = gaussian_teacher(SCHEDULE, MU, S)
    x = _x_at(t_start)
    exact = exact_flow(SCHEDULE, MU, S, x, t_start, t_end)
    errors = [(solve(teacher, x, t_start, t_end, n) - exact).abs().max().item() for n in (64, 128, 256, 512)]
    assert errors[-1] < 1e-2
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(0.85 < r < 1.15 for r in rates), rates  # DDIM is a first-order method


def test_ddim_is_exact_for_point_mass_data():
    """With s = 0 every DDIM step already lands on the exact flow, at any step count."""
    teacher = gaussian_teacher(SCHEDULE, MU, 0.0)
    x = _x_at(0.9)
    exact = exact_flow(SCHEDULE, MU, 0.0, x, 0.9, 0.1)
    torch.testing.assert_close(solve(teacher, x, 0.9, 0.1, 1), exact, rtol=1e-10, atol=1e-10)


def test_teacher_sampled_with_n_windows_is_n_step_ddim():
    teacher = gaussian_teacher(SCHEDULE, MU, S)
    noise = torch.randn(16, 8, dtype=torch.float64)
    x = noise
    times = torch.linspace(1, 0, 5, dtype=torch.float64)
    for t, t_next in zip(times[:-1], times[1:]):  # textbook DDIM loop
        a_t, a_s = SCHEDULE.abar(t), SCHEDULE.abar(t_next)
        x0, eps = to_x0_eps(teacher.predict(x, t), x, a_t, "epsilon")
        x = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
    torch.testing.assert_close(sample(teacher, noise, TimeWindows(4), 4), x, rtol=1e-12, atol=1e-12)


def _piecewise_straight_field(k: int, targets: torch.Tensor) -> Denoiser:
    """In window i every trajectory is the straight line to ``targets[i]`` at the window end."""
    windows = TimeWindows(k)

    def network(x, t, cond):
        _, t_end = windows.bounds(t)
        return (x - targets[windows.index(t)]) / (t - t_end).reshape(-1, 1)

    return Denoiser(network, "velocity")


@pytest.mark.parametrize("steps", [4, 7, 12])
def test_sampling_a_piecewise_straight_field_is_exact(steps):
    targets = torch.randn(4, 3, dtype=torch.float64)
    field = _piecewise_straight_field(4, targets)
    noise = torch.randn(5, 3, dtype=torch.float64)
    out, traj = sample(field, noise, TimeWindows(4), steps, return_trajectory=True)
    torch.testing.assert_close(out, targets[-1].expand(5, 3), rtol=1e-12, atol=1e-12)
    assert traj.shape == (steps + 1, 5, 3) and torch.equal(traj[0], noise)


def test_student_teacher_crosses_a_merged_window_with_one_euler_step_per_old_window():
    """solve(windows=old) over a merged window == Euler steps towards each old window's end."""
    targets = torch.randn(8, 3, dtype=torch.float64)
    old = TimeWindows(8)
    student = _piecewise_straight_field(8, targets)
    x = torch.randn(6, 3, dtype=torch.float64)
    t_start, t_end = torch.full((6,), 0.75, dtype=torch.float64), torch.full((6,), 0.5, dtype=torch.float64)
    out = solve(student, x, t_start, t_end, 2, windows=old)
    torch.testing.assert_close(out, targets[3].expand(6, 3))  # old windows 2 and 3 -> lands on target 3
    # a merged window crossed in one step would use only old window 2's field
    one = solve(student, x, t_start, t_end, 1, windows=old)
    assert not torch.allclose(one, out)


def test_guidance_combines_conditional_and_unconditional_outputs():
    def network(x, t, cond):
        return x * cond.reshape(-1, 1).to(x.dtype)

    d = Denoiser(network, "velocity")
    x = torch.randn(3, 2, dtype=torch.float64)
    cond, uncond = torch.tensor([2.0, 3.0, 4.0]), torch.tensor([1.0])
    out = d.predict(x, 0.5, cond, uncond, guidance=5.0)
    torch.testing.assert_close(out, x * 1.0 + 5.0 * (x * cond.reshape(-1, 1) - x * 1.0))
    torch.testing.assert_close(d.predict(x, 0.5, cond, uncond, guidance=1.0), x * cond.reshape(-1, 1))


def test_a_network_with_the_wrong_output_shape_is_a_clear_error():
    d = Denoiser(lambda x, t, c: x[:, :1], "velocity")
    with pytest.raises(ValueError, match="output must have its input's shape"):
        d.predict(torch.zeros(2, 3), 0.5)


def test_a_diffusion_denoiser_needs_a_schedule():
    with pytest.raises(ValueError, match="needs a VPSchedule"):
        Denoiser(lambda x, t, c: x, "epsilon")


def _orders(solver: str, t_start: float, t_end: float, counts=(8, 16, 32, 64)):
    teacher = gaussian_teacher(SCHEDULE, MU, S)
    x = _x_at(t_start)
    exact = exact_flow(SCHEDULE, MU, S, x, t_start, t_end)
    errors = [(solve(teacher, x, t_start, t_end, n, solver=solver) - exact).abs().max().item() for n in counts]
    return errors, [math.log2(a / b) for a, b in zip(errors, errors[1:])]


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun"])
@pytest.mark.parametrize("t_start,t_end,counts", [
    (1.0, 0.75, (8, 16, 32, 64)), (0.5, 0.25, (8, 16, 32, 64)),
    # to t = 0, where abar has a kink at t = 1 / T (flat below it); measured rates: DPM-Solver++(2M) on its
    # log-SNR grid 1.80, 1.93, 1.97; Heun 1.87, 1.93, 1.96 (DPM-Solver++ on a uniform t grid needed 256-2048
    # steps for its order to show)
    (0.25, 0.0, (16, 32, 64, 128))])
def test_second_order_solvers_converge_to_the_probability_flow_solution_at_second_order(solver, t_start, t_end,
                                                                                       counts):
    errors, rates = _orders(solver, t_start, t_end, counts)
    assert all(1.6 < r < 2.3 for r in rates) and 1.85 < rates[-1] < 2.15, (errors, rates)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun"])
def test_second_order_solvers_beat_ddim_at_equal_evaluations(solver):
    evals = 8
    ddim, _ = _orders("ddim", 0.5, 0.25, (evals,))
    other, _ = _orders(solver, 0.5, 0.25, (evals // {"dpmpp_2m": 1, "heun": 2}[solver],))
    assert other[0] < ddim[0] / 2, (other, ddim)  # measured: heun 2.5e-3 vs ddim 5.9e-3


def test_dpmpp_2m_steps_uniformly_in_log_snr_and_beats_ddim_to_t_0():
    from proreflow.solvers import log_snr, log_snr_grid

    x = torch.zeros(3, 2, dtype=torch.float64)
    grid = log_snr_grid(torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64), torch.tensor([0.5, 0.0, 0.0],
                        dtype=torch.float64), 4, x, SCHEDULE)
    times = torch.cat([grid[:, 0], grid[-1:, 1]])
    assert times[0].tolist() == [1.0, 0.5, 0.25] and times[-1].tolist() == [0.5, 0.0, 0.0]  # the ends exact
    assert torch.equal(grid[:, 2], grid[:, 1])  # each step's target is its own end
    h = log_snr(SCHEDULE.abar(times[1:])) - log_snr(SCHEDULE.abar(times[:-1]))
    torch.testing.assert_close(h, h[:1].expand_as(h), rtol=1e-12, atol=0)  # equal log-SNR steps
    ddim, _ = _orders("ddim", 0.25, 0.0, (8,))
    dpm, _ = _orders("dpmpp_2m", 0.25, 0.0, (8,))
    assert dpm[0] < ddim[0] / 20, (dpm, ddim)  # measured: 1.4e-3 against 1.0e-1


def test_log_snr_grid_keeps_uniform_t_where_lambda_is_infinite():
    from proreflow.solvers import log_snr_grid, solve_grid

    zero_snr = VPSchedule.from_betas(zero_terminal_snr=True)  # abar(1) = 0, lambda(1) = -inf
    x = torch.zeros(2, 3)
    torch.testing.assert_close(log_snr_grid(1.0, 0.5, 4, x, zero_snr), solve_grid(1.0, 0.5, 4, x), rtol=0, atol=0)


def test_heun_on_a_velocity_field_is_second_order():
    """dx/dt = -x t has the solution x(t) = x(1) exp((1 - t^2) / 2)."""
    d = Denoiser(lambda x, t, c: -x * t.reshape(-1, 1), "velocity")
    x = torch.randn(4, 3, dtype=torch.float64)
    exact = x * math.exp(0.5)
    errors = [(solve(d, x, 1.0, 0.0, n, solver="heun") - exact).abs().max().item() for n in (8, 16, 32)]
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(1.85 < r < 2.25 for r in rates), rates  # measured 2.16, 2.09


def test_every_solver_is_exact_for_point_mass_data():
    teacher = gaussian_teacher(SCHEDULE, MU, 0.0)
    x = _x_at(0.9)
    exact = exact_flow(SCHEDULE, MU, 0.0, x, 0.9, 0.1)
    for solver in ("dpmpp_2m", "heun"):
        torch.testing.assert_close(solve(teacher, x, 0.9, 0.1, 3, solver=solver), exact, rtol=1e-10, atol=1e-10)


def test_dpmpp_2m_needs_a_diffusion_teacher_and_students_take_euler_steps():
    d = Denoiser(lambda x, t, c: x, "velocity")
    with pytest.raises(ValueError, match="no \\(x0, eps\\) estimate"):
        solve(d, torch.zeros(2, 3), 1.0, 0.5, 2, solver="dpmpp_2m")
    with pytest.raises(ValueError, match="Euler steps"):
        solve(d, torch.zeros(2, 3), 1.0, 0.5, 2, windows=TimeWindows(4), solver="heun")
    with pytest.raises(ValueError, match="unknown solver"):
        solve(d, torch.zeros(2, 3), 1.0, 0.5, 2, solver="rk4")


@pytest.mark.parametrize("solver,per_step", [("ddim", 1), ("dpmpp_2m", 1), ("heun", 2)])
def test_a_guided_stage_teacher_counts_two_evaluations_per_guided_call(solver, per_step):
    from proreflow import StageTeacher, make_reflow_batch

    calls = []
    inner = exact_eps(SCHEDULE, MU, S)

    def network(x, timestep, cond):
        calls.append(x.shape[0])
        return inner(x, timestep, cond)

    teacher = StageTeacher(Denoiser(network, "epsilon", SCHEDULE), 3, guidance=2.0, solver=solver)
    x0 = torch.randn(5, 8, dtype=torch.float64)
    make_reflow_batch(x0, torch.randn_like(x0), TimeWindows(4), teacher, SCHEDULE,
                      cond=torch.ones(5), uncond=torch.zeros(1))
    assert sum(calls) == 3 * per_step * 2 * 5
