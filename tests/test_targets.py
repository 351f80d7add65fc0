import torch
from helpers.gaussian import exact_flow, gaussian_teacher

from proreflow import (
    Denoiser,
    StageTeacher,
    TimeWindows,
    VPSchedule,
    at_window_start,
    make_reflow_batch,
    make_trajectory_batch,
    sample_times,
    solve,
    teacher_trajectory,
)

SCHEDULE = VPSchedule.from_betas()


def test_batch_lies_on_the_segment_from_noised_data_to_the_teacher_landing():
    mu, s = 0.4, 0.5
    teacher = StageTeacher(gaussian_teacher(SCHEDULE, mu, s), steps=256)
    windows = TimeWindows(4)
    g = torch.Generator().manual_seed(0)
    x0 = mu + s * torch.randn(32, 6, generator=g, dtype=torch.float64)
    noise = torch.randn(32, 6, generator=g, dtype=torch.float64)
    batch = make_reflow_batch(x0, noise, windows, teacher, SCHEDULE, generator=g)
    t_start, t_end = windows.bounds(batch.t)
    assert torch.equal(batch.t_start, t_start) and torch.equal(batch.t_end, t_end)
    x_start = SCHEDULE.add_noise(x0, noise, t_start)
    # the segment: x_t - (t - t_start) v == x_start, and the endpoint is the teacher's exact flow
    back = batch.x_t - (batch.t - t_start).reshape(-1, 1) * batch.v_target
    torch.testing.assert_close(back, x_start, rtol=1e-12, atol=1e-12)
    x_end = x_start + (t_end - t_start).reshape(-1, 1) * batch.v_target
    exact = torch.stack([exact_flow(SCHEDULE, mu, s, x_start[i], t_start[i].item(), t_end[i].item())
                         for i in range(32)])
    assert (x_end - exact).abs().max() < 5e-3


def test_times_are_in_zero_one_and_t_one_is_in_the_first_window():
    t = sample_times(10_000, torch.Generator().manual_seed(0))
    assert bool((t > 0).all()) and bool((t <= 1).all())
    assert TimeWindows(8).index(torch.tensor([1.0])).item() == 0


def test_a_straight_teacher_gives_its_own_velocity_as_target():
    """A velocity teacher with constant field c: target v == c for every window and solver step count."""
    c = torch.randn(1, 5, dtype=torch.float64)
    teacher = StageTeacher(Denoiser(lambda x, t, cond: c.expand_as(x), "velocity"), steps=3)
    x0, noise = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    batch = make_reflow_batch(x0, noise, TimeWindows(2), teacher, SCHEDULE)
    torch.testing.assert_close(batch.v_target, c.expand(9, 5), rtol=1e-12, atol=1e-12)


def test_teacher_trajectory_follows_the_teacher_flow_from_noise():
    mu, s = 0.4, 0.5
    teacher = StageTeacher(gaussian_teacher(SCHEDULE, mu, s), steps=1)
    noise = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    states = teacher_trajectory(teacher, noise, TimeWindows(4), 64)
    assert states.shape == (5, 4, 3) and torch.equal(states[0], noise)
    for i, edge in enumerate(TimeWindows(4).edges().tolist()[1:], start=1):
        exact = torch.stack([exact_flow(SCHEDULE, mu, s, noise[j], 1.0, edge) for j in range(4)])
        assert (states[i] - exact).abs().max() < 1e-2


class Counted:
    """A nonlinear eps-network (fixed random weights) that counts the samples it is evaluated on."""

    def __init__(self, dim: int = 3):
        g = torch.Generator().manual_seed(7)
        self.w1 = torch.randn(dim + 1, 16, generator=g, dtype=torch.float64)
        self.w2 = 0.3 * torch.randn(16, dim, generator=g, dtype=torch.float64)
        self.calls = 0

    def __call__(self, x, timestep, cond):
        self.calls += x.shape[0]
        h = torch.cat([x, (timestep / 1000).to(x.dtype)[:, None]], dim=1)
        return torch.tanh(h @ self.w1) @ self.w2 + 0.5 * x


def test_a_merged_window_of_a_fine_trajectory_is_the_solve_with_the_merged_steps():
    """One trajectory through 8 window edges with S_f steps per window gives, for the windows of 4 and 2,
    pairs equal to a direct solve of the teacher from the pair's start with 2 S_f and 4 S_f steps (float64),
    for each one-step solver; a multistep solver (DPM-Solver++(2M)) restarts at every edge, so it does not."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(6, 3, generator=g, dtype=torch.float64)
    fine, steps = TimeWindows(8), 3
    edges = fine.edges().tolist()
    for solver in ("ddim", "heun"):
        teacher = StageTeacher(Denoiser(Counted(), "epsilon", SCHEDULE), steps=steps, solver=solver)
        states = teacher_trajectory(teacher, noise, fine, steps)
        for merged in (2, 4):
            for i in range(8 // merged):
                a, b = i * merged, (i + 1) * merged
                direct = solve(teacher.denoiser, states[a], edges[a], edges[b], steps * merged, solver=solver)
                torch.testing.assert_close(states[b], direct, rtol=0, atol=1e-13)
    teacher = StageTeacher(Denoiser(Counted(), "epsilon", SCHEDULE), steps=steps, solver="dpmpp_2m")
    states = teacher_trajectory(teacher, noise, fine, steps)
    direct = solve(teacher.denoiser, states[0], 1.0, edges[2], 2 * steps, solver="dpmpp_2m")
    assert (states[2] - direct).abs().max() > 1e-6


def test_a_trajectory_stops_each_sample_at_its_last_edge_and_counts_only_those_steps():
    network = Counted()
    teacher = StageTeacher(Denoiser(network, "epsilon", SCHEDULE), steps=2)
    noise = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = teacher_trajectory(teacher, noise, TimeWindows(4), 2)
    assert network.calls == 5 * 4 * 2
    network.calls = 0
    last = torch.tensor([4, 1, 2, 0, 3])
    part = teacher_trajectory(teacher, noise, TimeWindows(4), 2, last=last)
    assert network.calls == int(last.sum()) * 2
    for j, n in enumerate(last.tolist()):
        torch.testing.assert_close(part[: n + 1, j], full[: n + 1, j], rtol=0, atol=1e-14)
        assert bool(part[n + 1:, j].isnan().all())


def test_a_trajectory_batch_lies_on_the_segment_between_the_window_edges_of_the_trajectory():
    teacher = StageTeacher(Denoiser(Counted(), "epsilon", SCHEDULE), steps=2)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(16, 3, generator=g, dtype=torch.float64)
    t = sample_times(16, g).double()
    states = teacher_trajectory(teacher, noise, TimeWindows(8), 2)
    batch = make_trajectory_batch(noise, TimeWindows(2), teacher, TimeWindows(8), 2, t)
    i = TimeWindows(2).index(t)
    rows = torch.arange(16)
    x_start, x_end = states[4 * i, rows], states[4 * (i + 1), rows]
    span = (batch.t_end - batch.t_start)[:, None]
    torch.testing.assert_close(batch.v_target, (x_end - x_start) / span, rtol=0, atol=1e-13)
    torch.testing.assert_close(batch.x_t, x_start + (t - batch.t_start)[:, None] * batch.v_target, rtol=0, atol=1e-13)


def test_at_window_start_gives_the_batch_drawn_at_the_window_starts():
    """Moving samples to their window's start equals drawing them there: x_t == x_start, same targets."""
    mu, s = 0.4, 0.5
    teacher = StageTeacher(gaussian_teacher(SCHEDULE, mu, s), steps=8)
    windows = TimeWindows(4)
    g = torch.Generator().manual_seed(1)
    x0 = mu + s * torch.randn(16, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(16, 3, generator=g, dtype=torch.float64)
    t = sample_times(16, g).double()
    batch = make_reflow_batch(x0, noise, windows, teacher, SCHEDULE, t=t)
    mask = torch.arange(16) % 3 == 0
    moved = at_window_start(batch, mask)
    direct = make_reflow_batch(x0, noise, windows, teacher, SCHEDULE, t=torch.where(mask, batch.t_start, t))
    for name in ("x_t", "t", "v_target", "t_start", "t_end"):
        torch.testing.assert_close(getattr(moved, name), getattr(direct, name), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moved.x_t[mask], SCHEDULE.add_noise(x0, noise, batch.t_start)[mask],
                               rtol=1e-12, atol=1e-12)
    assert torch.equal(moved.x_t[~mask], batch.x_t[~mask]) and torch.equal(moved.t[~mask], t[~mask])
