"""Time windows of piecewise rectified flow.

Convention: ``t`` in [0, 1], ``t = 1`` is pure noise, ``t = 0`` is data. ``TimeWindows(k)``
splits [0, 1] into ``k`` equal windows with edges ``1 = e_0 > e_1 > ... > e_k = 0``.
Window ``i`` is ``(t_start, t_end) = (e_i, e_{i+1})``; a point on an edge belongs to the
window that *starts* there, so window ``i`` holds ``e_{i+1} < t <= e_i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MAX_WINDOWS = 1024
"""The most windows a recipe, a run or a sampler takes (more is a typo, not a recipe)."""


@dataclass(frozen=True)
class TimeWindows:
    """``k`` equal windows over t in [0, 1], ordered from noise (t = 1) to data (t = 0)."""

    count: int

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or isinstance(self.count, bool) or self.count < 1:
            raise ValueError(f"TimeWindows needs a positive integer count, got {self.count!r}")

    def edges(self, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
        """Edges ``e_i = 1 - i / k`` for ``i = 0..k`` (descending)."""
        i = torch.arange(self.count + 1, dtype=torch.float64, device=device)
        return (1.0 - i / self.count).to(dtype)

    def index(self, t: Tensor) -> Tensor:
        """Window index of each ``t``: the ``i`` with ``e_{i+1} < t <= e_i``.

        ``t = 0`` (the last window's end) is put in the last window.
        """
        t = torch.as_tensor(t)
        if t.numel() and (bool((t < 0).any()) or bool((t > 1).any())):
            raise ValueError("window lookup needs t in [0, 1] (t = 1 is noise, t = 0 is data)")
        inner = self.edges(torch.float64, t.device)[1:]  # e_1 .. e_k
        idx = (inner.unsqueeze(0) >= t.to(torch.float64).reshape(-1, 1)).sum(dim=1)
        return idx.clamp(max=self.count - 1).reshape(t.shape)

    def bounds(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(t_start, t_end)`` of the window holding each ``t`` (same shape and dtype as t)."""
        t = torch.as_tensor(t)
        dtype = t.dtype if t.is_floating_point() else torch.float32
        i = self.index(t)
        edges = self.edges(torch.float64, t.device)
        return edges[i].to(dtype), edges[i + 1].to(dtype)

    def edge_indices(self, t: Tensor, fine: TimeWindows) -> tuple[Tensor, Tensor]:
        """Indices among the edges of ``fine`` (whose windows nest in these: ``fine.count = r * count``) of
        the start and end edge of the window holding each ``t``: ``(r i, r (i + 1))`` for window ``i``."""
        if fine.count % self.count:
            raise ValueError(f"{self.count} windows do not nest in {fine.count}: the finer count must be a multiple")
        ratio = fine.count // self.count
        i = self.index(t)
        return i * ratio, (i + 1) * ratio

    def merge(self) -> TimeWindows:
        """Join neighbouring windows pairwise: ``k -> k / 2``."""
        if self.count % 2:
            raise ValueError(f"cannot merge {self.count} windows pairwise: the count must be even")
        return TimeWindows(self.count // 2)

    def for_steps(self, steps: int) -> TimeWindows:
        """The windows a sampler with ``steps`` steps walks: these, or ``TimeWindows(steps)`` for fewer steps
        than windows; a step then spans whole windows, and a student's output is read as the velocity to the
        step's end (an epsilon student jumps like DDIM with ``steps`` steps)."""
        return self if steps >= self.count else TimeWindows(steps)

    def steps_per_window(self, steps: int) -> list[int]:
        """Spread ``steps`` sampler steps evenly over the windows (earlier windows take the rest)."""
        if steps < self.count:
            raise ValueError(
                f"{steps} sampling steps cannot cover {self.count} windows: use steps >= {self.count}"
            )
        base, extra = divmod(steps, self.count)
        return [base + (1 if i < extra else 0) for i in range(self.count)]

    def time_grid(self, steps: int) -> list[tuple[float, float, float]]:
        """Sampler grid: one ``(t, t_next, t_window_end)`` per step, from t = 1 to t = 0: each window's
        :func:`uniform_times` with its share of ``steps``. Every sampler steps along this grid."""
        edges = self.edges(torch.float64).tolist()
        grid = []
        for i, n in enumerate(self.steps_per_window(steps)):
            times = uniform_times(edges[i], edges[i + 1], n).tolist()
            grid.extend((times[j], times[j + 1], edges[i + 1]) for j in range(n))
        return grid


def uniform_times(t_start, t_end, steps: int, device=None) -> Tensor:
    """``s_j = t_start + (t_end - t_start) * j / steps`` for ``j = 0..steps`` in float64, shape
    ``(steps + 1, *ends)`` (the ends: floats, or per-sample ``(B,)`` tensors)."""
    t0, t1 = (torch.as_tensor(t, dtype=torch.float64, device=device) for t in (t_start, t_end))
    return torch.stack([t0 + (t1 - t0) * j / steps for j in range(steps + 1)])
