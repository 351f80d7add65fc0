"""Fidelity to the teacher and trajectory straightness: definitions checked on known answers."""

import pytest
import torch

from proreflow import Denoiser, TimeWindows, VPSchedule, sample
from proreflow.builtin import MLPDenoiser
from proreflow.evaluation import fidelity, fidelity_to_teacher, sampler_straightness, straightness, trajectory_times


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    net = MLPDenoiser((2,), width=16, depth=1).double()
    torch.nn.init.normal_(net.out[-1].weight, std=0.3)
    return Denoiser(lambda x, t, c: net(x, t, c), "epsilon", VPSchedule.from_betas())


def test_straight_trajectory_has_zero_straightness():
    times = trajectory_times(TimeWindows(3), 7)  # uneven steps: 3 + 2 + 2 over the windows
    noise, data = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    path = torch.stack([data + t * (noise - data) for t in times])  # x_t on the line, constant speed
    assert straightness(path, times) == pytest.approx(0.0, abs=1e-24)


def test_straightness_of_a_bent_path():
    # x: 0 at t = 1, a at t = 1/2, b at t = 0. v1 = -2a, v2 = -2(b - a), v* = -b:
    # S = 1/2 |b - 2a|^2 + 1/2 |2a - b|^2 = |b - 2a|^2 (per element, one element)
    a, b = 0.7, 0.2
    path = torch.tensor([[[0.0]], [[a]], [[b]]], dtype=torch.float64)
    assert straightness(path, torch.tensor([1.0, 0.5, 0.0])) == pytest.approx((b - 2 * a) ** 2)


def test_trajectory_times_match_the_sampler(teacher):
    windows = TimeWindows(2)
    _, trajectory = sample(teacher, torch.randn(3, 2, dtype=torch.float64), windows, 5, return_trajectory=True)
    times = trajectory_times(windows, 5)
    assert trajectory.shape[0] == times.numel() == 6 and times[0] == 1 and times[-1] == 0
    expected = [1, 5 / 6, 4 / 6, 0.5, 0.25, 0]  # 3 steps in the first window, 2 in the second
    assert torch.allclose(times, torch.tensor(expected, dtype=torch.float64))


def test_one_step_sampler_is_straight_and_teacher_is_not(teacher):
    noise = torch.randn(64, 2, dtype=torch.float64)
    assert sampler_straightness(teacher, noise, TimeWindows(1), 1) == 0.0
    assert sampler_straightness(teacher, noise, TimeWindows(8), 8) > 1e-6


def test_fidelity_definition():
    ref = torch.zeros(2, 1, 2, 2)
    samples = torch.stack([torch.full((1, 2, 2), 0.5), torch.tensor([[[1.0, 1.0], [1.0, -1.0]]])])
    assert fidelity(samples, ref) == pytest.approx((0.5 + 1.0) / 2)  # per-sample RMS, averaged
    with pytest.raises(ValueError, match="equal shapes"):
        fidelity(samples, ref[:1])


def test_fidelity_of_identical_samplers_is_zero(teacher):
    noise = torch.randn(32, 2, dtype=torch.float64)
    assert fidelity_to_teacher(teacher, teacher, noise, TimeWindows(32), 32) == 0.0
    assert fidelity_to_teacher(teacher, teacher, noise, TimeWindows(2), 2) > 0.0
