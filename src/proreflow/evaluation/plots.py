"""Pictures for reports: sample grids, 2D scatter plots and trajectories, loss curves (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from ..sampling import sample  # noqa: E402
from ..solvers import REFERENCE_STEPS  # noqa: E402
from ..teachers import Denoiser  # noqa: E402
from ..windows import TimeWindows  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_grid(samples: Mapping[str, Tensor], path: Path, per_row: int = 20) -> None:
    """One row per sampler of the first ``per_row`` images (in [-1, 1], shape (N, C, H, W))."""
    fig, axes = plt.subplots(len(samples), 1, figsize=(per_row * 0.5, 0.65 * len(samples) + 0.3), squeeze=False)
    for ax, (name, images) in zip(axes[:, 0], samples.items()):
        row = images[:per_row].clamp(-1, 1).add(1).div(2)  # (n, C, H, W) in [0, 1]
        strip = torch.cat(list(row.permute(0, 2, 3, 1)), dim=1)  # H x (n W) x C
        ax.imshow(strip.squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    _save(fig, path)


def scatter_panels(samples: Mapping[str, Tensor], real: Tensor, path: Path, limit: float = 3.0) -> None:
    """2D samples of each sampler beside the real data."""
    panels = {"data": real, **samples}
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8), squeeze=False)
    for ax, (name, x) in zip(axes[0], panels.items()):
        ax.scatter(x[:2000, 0], x[:2000, 1], s=1, alpha=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    _save(fig, path)


def trajectory_panels(teacher: Denoiser, student: Denoiser, windows: TimeWindows, noise: Tensor, path: Path,
                      fine_steps: int = REFERENCE_STEPS) -> None:
    """Paths from noise to data: the teacher's DDIM-``fine_steps`` ODE, and the student sampled with as many small Euler
    steps (its own field, finely resolved: straight pieces inside each of its windows)."""
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.2))
    runs = {f"teacher ODE (DDIM-{fine_steps})": (teacher, TimeWindows(fine_steps)),
            f"student ({windows.count} windows, {fine_steps} steps)": (student, windows)}
    for ax, (name, (model, w)) in zip(axes, runs.items()):
        _, traj = sample(model, noise, w, fine_steps, return_trajectory=True)
        for i in range(traj.shape[1]):
            ax.plot(traj[:, i, 0], traj[:, i, 1], lw=0.4, alpha=0.5, color="tab:blue")
        ax.scatter(traj[0, :, 0], traj[0, :, 1], s=2, color="tab:gray", label="noise (t = 1)")
        ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=2, color="tab:red", label="sample (t = 0)")
        ax.set_title(name, fontsize=9)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=7, loc="lower left")
    _save(fig, path)


def loss_curve(history: Sequence[tuple[int, float]], stage_steps: Sequence[int], path: Path) -> None:
    """Training loss against optimiser step (log scale), with stage boundaries."""
    fig, ax = plt.subplots(figsize=(6, 3))
    if history:
        steps, losses = zip(*history)
        ax.plot(steps, losses, lw=0.6)
        ax.set_yscale("log")
    edge = 0
    for n in stage_steps[:-1]:
        edge += n
        ax.axvline(edge, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    _save(fig, path)
