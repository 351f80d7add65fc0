"""Frechet distance: closed forms for Gaussian statistics, zero for a set against itself."""

import numpy as np
import pytest
import torch

from proreflow.evaluation import frechet_distance, frechet_distance_from_stats, gaussian_stats


def test_diagonal_covariances_closed_form():
    # sqrt(S_x S_y) is diagonal with sqrt(a_i b_i): FD = |mu_x - mu_y|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu_x, mu_y = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 5.0 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance_from_stats(mu_x, np.diag(a), mu_y, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_same_covariance_leaves_the_mean_term():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(5, 5))
    sigma = m @ m.T + np.eye(5)
    mu = rng.normal(size=5)
    assert frechet_distance_from_stats(mu, sigma, mu + 0.5, sigma) == pytest.approx(5 * 0.25, rel=1e-8)


def test_a_set_against_itself_is_zero():
    f = torch.randn(400, 16)
    assert frechet_distance(f, f.clone()) == pytest.approx(0.0, abs=1e-8)


def test_gaussian_stats_are_unbiased():
    f = np.random.default_rng(1).normal(size=(50, 3))
    mu, sigma = gaussian_stats(torch.from_numpy(f))
    assert np.allclose(mu, f.mean(0)) and np.allclose(sigma, np.cov(f, rowvar=False))
    with pytest.raises(ValueError, match="n >= 2"):
        gaussian_stats(f[:1])
