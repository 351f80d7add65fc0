"""Sliced Wasserstein and energy distance: zero on identical sets, closed forms for Gaussians."""

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from proreflow.builtin import sample_toy
from proreflow.builtin.distributions import energy_distance, sliced_wasserstein, toy_distances


def gaussians(n, mu, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64) + mu


def test_identical_sets_are_at_distance_zero():
    x = torch.randn(500, 2)
    assert sliced_wasserstein(x, x.clone()) == 0.0
    assert energy_distance(x, x.clone()) == 0.0


def test_sliced_wasserstein_of_shifted_gaussians():
    # W2 between N(0, 1) and N(<theta, mu>, 1) is |<theta, mu>|; E <theta, mu>^2 = |mu|^2 / d
    mu = torch.tensor([1.5, 0.0], dtype=torch.float64)
    x, y = gaussians(20_000, mu, 0)
    assert sliced_wasserstein(x, y, projections=500) == pytest.approx(1.5 / math.sqrt(2), rel=0.03)


def test_sliced_wasserstein_is_exact_matching_in_1d():
    x, y = torch.tensor([[0.0], [1.0], [5.0]]), torch.tensor([[2.0], [1.0], [0.0]])
    # sorted pairs (0,0), (1,1), (5,2): W2^2 = 9 / 3
    assert sliced_wasserstein(x, y, projections=3) == pytest.approx(math.sqrt(3.0))
    assert sliced_wasserstein(x, y[:2], projections=3) > 0  # different sizes are fine


def rice_mean(nu, sigma):
    """E|Z| for Z ~ N(m, sigma^2 I_2), |m| = nu."""
    x = -(nu**2) / (2 * sigma**2)
    laguerre = math.exp(x / 2) * ((1 - x) * special.i0(-x / 2) - x * special.i1(-x / 2))
    return sigma * math.sqrt(math.pi / 2) * laguerre


def test_energy_distance_of_shifted_gaussians():
    # X - Y ~ N(mu, 2 I) and X - X' ~ N(0, 2 I): D^2 = 2 E|N(mu, 2I)| - 2 E|N(0, 2I)|
    mu = torch.tensor([1.0, 0.0], dtype=torch.float64)
    expected = math.sqrt(2 * rice_mean(1.0, math.sqrt(2)) - 2 * rice_mean(0.0, math.sqrt(2)))
    x, y = gaussians(4000, mu, 1)
    assert energy_distance(x, y) == pytest.approx(expected, rel=0.05)


def test_energy_distance_matches_scipy_in_1d():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=300), rng.normal(0.5, 2.0, size=200)
    ours = energy_distance(torch.from_numpy(a)[:, None], torch.from_numpy(b)[:, None])
    assert ours == pytest.approx(stats.energy_distance(a, b), rel=1e-9)


def test_toy_distances_separate_right_from_wrong_samples():
    right = toy_distances(sample_toy("moons", 3000, seed=5), "moons", n_true=3000)
    wrong = toy_distances(sample_toy("8gaussians", 3000, seed=5), "moons", n_true=3000)
    assert right["energy_distance"] < 0.1 < wrong["energy_distance"]
    assert right["sliced_wasserstein"] < 0.1 < wrong["sliced_wasserstein"]


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="point sets"):
        energy_distance(torch.zeros(3, 2), torch.zeros(3, 3))
