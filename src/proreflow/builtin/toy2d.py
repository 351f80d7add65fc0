"""2D toy distributions with exact samplers (teachers train on them, evaluation compares to them).

All three are scaled to roughly unit variance, the scale a VP diffusion expects:

- ``checkerboard``: uniform on the 8 dark unit squares of a 4 x 4 board over [-2, 2]^2, the
  squares ``[i - 2, i - 1] x [j - 2, j - 1]`` with ``i + j`` even.
- ``8gaussians``: equal mixture of ``N(c_k, 0.15^2 I)``, ``c_k = 2 (cos(k pi / 4), sin(k pi / 4))``.
- ``moons``: scikit-learn's two moons with the angle drawn uniformly,
  ``(cos th, sin th)`` and ``(1 - cos th, 0.5 - sin th)`` for ``th ~ U[0, pi]``, plus
  ``N(0, 0.05^2 I)`` noise, then centred at ``(0.5, 0.25)`` and scaled by 1.5.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

ToySampler = Callable[[int, "torch.Generator | None"], Tensor]


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` points uniform on the dark squares of a 4 x 4 board over [-2, 2]^2."""
    u = torch.rand(n, 2, generator=generator)
    col = torch.randint(0, 4, (n,), generator=generator)
    row = 2 * torch.randint(0, 2, (n,), generator=generator) + col % 2  # i + j even
    return torch.stack([col + u[:, 0], row + u[:, 1]], dim=1) - 2.0


def eight_gaussians(n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` points from the equal mixture of ``N(2 (cos(k pi/4), sin(k pi/4)), 0.15^2 I)``."""
    angle = torch.randint(0, 8, (n,), generator=generator).float() * (math.pi / 4)
    centres = 2.0 * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centres + 0.15 * torch.randn(n, 2, generator=generator)


def two_moons(n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` points from two interleaved half circles (noise 0.05), centred and scaled by 1.5."""
    theta = math.pi * torch.rand(n, generator=generator)
    lower = torch.rand(n, generator=generator) < 0.5
    x = torch.where(lower, 1 - theta.cos(), theta.cos())
    y = torch.where(lower, 0.5 - theta.sin(), theta.sin())
    points = torch.stack([x, y], dim=1) + 0.05 * torch.randn(n, 2, generator=generator)
    return 1.5 * (points - torch.tensor([0.5, 0.25]))


TOY_SAMPLERS: dict[str, ToySampler] = {
    "checkerboard": checkerboard,
    "8gaussians": eight_gaussians,
    "moons": two_moons,
}


def sample_toy(name: str, n: int, seed: int | None = None) -> Tensor:
    """``n`` exact samples ``(n, 2)`` float32 of the toy distribution ``name`` (seeded if ``seed``)."""
    if name not in TOY_SAMPLERS:
        raise ValueError(f"unknown 2D distribution {name!r}; choose one of {sorted(TOY_SAMPLERS)}")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return TOY_SAMPLERS[name](n, generator)
