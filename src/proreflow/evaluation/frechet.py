"""Frechet distance between Gaussian fits of two feature sets (FD / FID), in float64.

``FD = |mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x S_y)^{1/2})`` with the means ``mu`` and the
unbiased covariances ``S`` of the features; the matrix square root is ``scipy.linalg.sqrtm``.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg
from torch import Tensor


def gaussian_stats(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(d,)`` and unbiased covariance ``(d, d)`` of ``(n, d)`` features, float64."""
    f = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape (n >= 2, d), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance_from_stats(mu_x: np.ndarray, sigma_x: np.ndarray, mu_y: np.ndarray, sigma_y: np.ndarray,
                                eps: float = 1e-6) -> float:
    """FD of ``N(mu_x, sigma_x)`` and ``N(mu_y, sigma_y)``.

    If ``S_x S_y`` is singular, ``eps I`` is added to both covariances before the square root.
    """
    mu_x, mu_y = np.asarray(mu_x, np.float64), np.asarray(mu_y, np.float64)
    sigma_x, sigma_y = np.asarray(sigma_x, np.float64), np.asarray(sigma_y, np.float64)
    if mu_x.shape != mu_y.shape or sigma_x.shape != sigma_y.shape:
        raise ValueError("the two feature sets have different dimensions")
    covmean = linalg.sqrtm(sigma_x @ sigma_y)
    if not np.isfinite(covmean).all():
        offset = eps * np.eye(sigma_x.shape[0])
        covmean = linalg.sqrtm((sigma_x + offset) @ (sigma_y + offset))
    covmean = np.real(covmean)
    diff = mu_x - mu_y
    return float(max(diff @ diff + np.trace(sigma_x) + np.trace(sigma_y) - 2 * np.trace(covmean), 0.0))


def frechet_distance(x_features: Tensor | np.ndarray, y_features: Tensor | np.ndarray) -> float:
    """FD between two feature sets ``(n, d)`` and ``(m, d)``."""
    return frechet_distance_from_stats(*gaussian_stats(x_features), *gaussian_stats(y_features))


