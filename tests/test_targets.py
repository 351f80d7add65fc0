import torch
from gaussian import exact_flow, gaussian_teacher

from proreflow import (
    Denoiser,
    StageTeacher,
    TimeWindows,
    VPSchedule,
    at_window_start,
    make_reflow_batch,
    sample_times,
    teacher_start_points,
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


def test_teacher_start_points_follow_the_teacher_flow_from_noise():
    mu, s = 0.4, 0.5
    teacher = StageTeacher(gaussian_teacher(SCHEDULE, mu, s), steps=1)
    noise = torch.randn(4, 3, dtype=torch.float64)
    t_start = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    x = teacher_start_points(teacher, noise, t_start, steps=256)
    torch.testing.assert_close(x[0], noise[0])  # t_start = 1: nothing to solve
    for i in range(1, 4):
        exact = exact_flow(SCHEDULE, mu, s, noise[i], 1.0, t_start[i].item())
        assert (x[i] - exact).abs().max() < 1e-2


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
