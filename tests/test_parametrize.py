"""The student parametrization: a student equal to the teacher reproduces the teacher's DDIM step."""

import pytest
import torch
from helpers.gaussian import exact_eps

from proreflow import (
    Denoiser,
    TimeWindows,
    VPSchedule,
    convert_output,
    ddim_step,
    output_to_velocity,
    sample,
    to_x0_eps,
    velocity_to_output,
)

SCHEDULE = VPSchedule.from_betas()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_student_equal_to_teacher_stepped_once_per_window_is_one_ddim_step_per_window(prediction_type, k):
    eps_net = exact_eps(SCHEDULE, 0.3, 0.5)

    def network(x, timestep, cond):  # the same teacher, reporting in another output type
        t = SCHEDULE.time(timestep)
        return convert_output(eps_net(x, timestep, cond), x, SCHEDULE.abar(t), "epsilon", prediction_type)

    student = Denoiser(network, prediction_type, SCHEDULE)
    noise = torch.randn(7, 2, 3, dtype=torch.float64)
    x = noise
    edges = TimeWindows(k).edges()
    for t_start, t_end in zip(edges[:-1], edges[1:]):  # the teacher's DDIM, window start -> window end
        t = t_start.expand(7)
        x0, eps = to_x0_eps(eps_net(x, SCHEDULE.timestep(t), None), x, SCHEDULE.abar(t), "epsilon")
        x = ddim_step(x0, eps, SCHEDULE.abar(t_end.expand(7)))
    torch.testing.assert_close(sample(student, noise, TimeWindows(k), k), x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "velocity"])
def test_velocity_and_output_round_trip(prediction_type):
    g = torch.Generator().manual_seed(3)
    x, out = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64) * 0.9 + 0.1
    t_end = t - 0.1
    v = output_to_velocity(out, x, t, t_end, prediction_type, SCHEDULE)
    back = velocity_to_output(v, x, t, t_end, prediction_type, SCHEDULE)
    torch.testing.assert_close(back, out, rtol=1e-8, atol=1e-8)


def test_epsilon_velocity_is_affine_in_the_output():
    """v = ((c_x - 1) x + c_eps eps) / (s - t): guiding eps or guiding v gives the same velocity."""
    x, e1, e2 = (torch.randn(4, 3, dtype=torch.float64) for _ in range(3))
    t, s = torch.full((4,), 0.8, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    w = 3.0

    def vel(e):
        return output_to_velocity(e, x, t, s, "epsilon", SCHEDULE)

    torch.testing.assert_close(vel(e1 + w * (e2 - e1)), vel(e1) + w * (vel(e2) - vel(e1)))


def test_half_precision_outputs_use_float32_schedule_math():
    x = torch.randn(2, 3)
    v = output_to_velocity(torch.randn(2, 3).bfloat16(), x, torch.full((2,), 0.6), torch.full((2,), 0.4),
                           "epsilon", SCHEDULE)
    assert v.dtype == torch.float32


def test_velocity_prediction_passes_through_and_diffusion_outputs_need_a_schedule():
    out = torch.randn(2, 3)
    assert torch.equal(output_to_velocity(out, torch.zeros(2, 3), 0.5, 0.25, "velocity"), out)
    with pytest.raises(ValueError, match="VPSchedule"):
        output_to_velocity(out, torch.zeros(2, 3), 0.5, 0.25, "epsilon")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_flat_abar_gives_output_zero_where_every_output_makes_the_same_empty_step(prediction_type):
    """abar is flat for t <= 1 / T (trailing grid): the DDIM step from t to s there is x_t for every output,
    so the inverse is undetermined; it returns 0, finite, and its other samples are unchanged."""
    g = torch.Generator().manual_seed(5)
    x, out = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.6, 0.0005, 0.001], dtype=torch.float64)
    s = torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64)
    v = output_to_velocity(out, x, t, s, prediction_type, SCHEDULE)
    torch.testing.assert_close(v[1:], torch.zeros(2, 4, dtype=torch.float64), atol=1e-12, rtol=0)
    back = velocity_to_output(v.requires_grad_(True), x, t, s, prediction_type, SCHEDULE)
    assert (back[1:] == 0).all()
    torch.testing.assert_close(back[:1], out[:1], rtol=1e-8, atol=1e-8)
    back.sum().backward()
    assert torch.isfinite(v.grad).all()
