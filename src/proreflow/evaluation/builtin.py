"""All metrics of a sampler on a built-in dataset, from one call.

- 2D sets: sliced Wasserstein-2 and energy distance to 10k exact samples (:mod:`.distributions`).
- Image sets: FD to the real images (``all`` split) in the feature space of the dataset's
  classifier, and the class accuracy of the class-conditional samples (:mod:`.classifier`);
  labels are balanced, ``i mod num_classes`` for sample ``i``.
- Always: straightness of the sampler's trajectories (:mod:`.fidelity`); with a ``teacher``,
  the fidelity to its DDIM-32 samples from the same noise, labels and guidance.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..data import get_spec, load_dataset
from ..sampling import sample
from ..teachers import Denoiser
from ..windows import TimeWindows
from .classifier import class_accuracy, feature_fd, load_or_train_classifier
from .distributions import toy_distances
from .fidelity import TEACHER_STEPS, fidelity, straightness, trajectory_times


def balanced_labels(data: str, n: int) -> Tensor | None:
    """Class labels ``i mod num_classes`` for ``n`` samples (None for an unconditional set)."""
    spec = get_spec(data)
    return torch.arange(n) % spec.num_classes if spec.num_classes else None


def sample_metrics(data: str, samples: Tensor, labels: Tensor | None = None,
                   cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> dict[str, float]:
    """Distribution metrics of ``samples`` of built-in dataset ``data`` (module doc)."""
    spec = get_spec(data)
    if spec.is_2d:
        return toy_distances(samples.cpu(), data)
    classifier = load_or_train_classifier(data, cache_dir=cache_dir, device=device)
    metrics = {"fd": feature_fd(classifier, samples, load_dataset(data, "all").x)}
    if labels is not None:
        metrics["class_accuracy"] = class_accuracy(classifier, samples, labels)
    return metrics


@torch.no_grad()
def evaluate_sampler(data: str, denoiser: Denoiser, windows: TimeWindows, steps: int, *,
                     teacher: Denoiser | None = None, n: int = 1000, guidance: float = 1.0, seed: int = 0,
                     teacher_steps: int = TEACHER_STEPS, cache_dir: str | os.PathLike | None = None,
                     device: str | torch.device = "cpu") -> dict[str, float]:
    """Sample ``n`` items with ``sample(denoiser, noise, windows, steps, ...)`` from seeded noise and
    return :func:`sample_metrics`, ``straightness`` and (with ``teacher``) ``fidelity``."""
    spec = get_spec(data)
    noise = torch.randn(n, *spec.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    labels = balanced_labels(data, n)
    cond = None if labels is None else labels.to(device)
    uncond = None if spec.uncond is None else spec.uncond.to(device)
    x, trajectory = sample(denoiser, noise, windows, steps, cond, uncond, guidance, return_trajectory=True)
    metrics = sample_metrics(data, x, labels, cache_dir, device)
    metrics["straightness"] = straightness(trajectory, trajectory_times(windows, steps))
    if teacher is not None:
        reference = sample(teacher, noise, TimeWindows(teacher_steps), teacher_steps, cond, uncond, guidance)
        metrics["fidelity"] = fidelity(x, reference)
    return metrics
