"""Distances between point clouds (2D built-in data): sliced Wasserstein and energy distance.

Both compare the empirical distributions of ``x`` ``(n, d)`` and ``y`` ``(m, d)``; they are 0
for identical sets and are computed in float64.

- Sliced Wasserstein-2: ``SW2(x, y) = sqrt( mean_k W2^2(<theta_k, x>, <theta_k, y>) )`` over
  ``K`` random directions ``theta_k`` uniform on the unit sphere. In 1D, ``W2^2`` is the mean
  squared difference of the quantile functions, evaluated at the levels ``(i + 1/2) / M`` with
  ``M = max(n, m)`` (exact for ``n = m``: sorted values matched in order). For
  ``N(0, I)`` vs ``N(mu, I)`` in ``d`` dimensions ``SW2 = |mu| / sqrt(d)``.
- Energy distance: ``E(x, y) = sqrt(2 E|X - Y| - E|X - X'| - E|Y - Y'|)`` with all pairs
  (V-statistics, the energy distance of the two empirical distributions; in 1D it equals
  ``scipy.stats.energy_distance``).

Finite samples: both read above 0 for two independent samples of one distribution (about 0.015
for 10k vs 10k points of the built-in 2D sets), so compare samplers at equal sample counts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .toy2d import sample_toy


def _check(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected point sets (n, d) and (m, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    return x.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)


def sliced_wasserstein(x: Tensor, y: Tensor, projections: int = 1000, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance over ``projections`` seeded random directions (see module doc)."""
    x, y = _check(x, y)
    theta = torch.randn(x.shape[1], projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(dim=0).values, (y @ theta).sort(dim=0).values
    levels = (torch.arange(max(len(x), len(y)), dtype=torch.float64) + 0.5) / max(len(x), len(y))
    qx, qy = px[(levels * len(x)).long()], py[(levels * len(y)).long()]
    return float((qx - qy).pow(2).mean().sqrt())


def _mean_pairwise(a: Tensor, b: Tensor, chunk: int = 2048) -> Tensor:
    """``mean_{i,j} |a_i - b_j|`` in chunks of rows."""
    total = sum(torch.cdist(a[i:i + chunk], b).sum() for i in range(0, len(a), chunk))
    return total / (len(a) * len(b))


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance ``sqrt(2 E|X-Y| - E|X-X'| - E|Y-Y'|)`` of the empirical distributions."""
    x, y = _check(x, y)
    d2 = 2 * _mean_pairwise(x, y) - _mean_pairwise(x, x) - _mean_pairwise(y, y)
    return float(d2.clamp(min=0).sqrt())


def toy_distances(samples: Tensor, name: str, n_true: int = 10_000, seed: int = 12345) -> dict[str, float]:
    """Distances of ``samples`` to ``n_true`` exact samples of the 2D distribution ``name``."""
    true = sample_toy(name, n_true, seed=seed)
    return {"sliced_wasserstein": sliced_wasserstein(samples, true), "energy_distance": energy_distance(samples, true)}
