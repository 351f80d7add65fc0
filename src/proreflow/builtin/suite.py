"""Evaluate samplers of a built-in dataset on one fixed set of noise and conditions.

``make_eval_set`` draws the noise and (class-balanced) conditions once, samples the teacher's
DDIM-32 reference from them and loads the real held-out data; ``evaluate_sampler`` then scores
any sampler (teacher DDIM-n, DPM-Solver, a student at n steps) on exactly those inputs, so the
rows of a table differ only in the sampler. Metrics: FD and class accuracy (image sets, with
the cached feature classifier) or sliced Wasserstein / energy distance (2D sets), fidelity to
the teacher, straightness, network evaluations per sample (NFE) and wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..conditioning import Cond
from ..evaluation.fidelity import fidelity, straightness, trajectory_times
from ..sampling import sample
from ..solvers import REFERENCE_STEPS
from ..teachers import Denoiser
from ..windows import TimeWindows
from .classifier import TrainedClassifier, class_accuracy, feature_fd, load_or_train_classifier
from .data import get_spec, load_dataset
from .distributions import toy_distances

NoiseToSamples = Callable[[Tensor, Cond], Tensor]
"""``sampler(noise, cond) -> samples``: anything that turns the fixed noise into data."""


@dataclass
class EvalSet:
    """Fixed inputs of an evaluation: noise, conditions, teacher reference, real data."""

    data: str
    noise: Tensor
    cond: Tensor | None
    uncond: Tensor | None
    guidance: float
    reference: Tensor
    real: Tensor
    classifier: TrainedClassifier | None = None


def make_eval_set(data: str, teacher: Denoiser, num_samples: int = 1000, guidance: float = 1.0, seed: int = 0,
                  cache_dir=None, progress: bool = True) -> EvalSet:
    """Noise and balanced labels from ``seed``; the teacher's DDIM-32 reference at ``guidance``."""
    spec = get_spec(data)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_samples, *spec.shape, generator=g)
    cond = torch.arange(num_samples) % spec.num_classes if spec.num_classes else None
    uncond = spec.uncond
    reference = sample(teacher, noise, TimeWindows(REFERENCE_STEPS), REFERENCE_STEPS, cond, uncond, guidance)
    if spec.is_2d:
        real, classifier = load_dataset(data, "test").x, None
    else:
        real = load_dataset(data, "test").x
        classifier = load_or_train_classifier(data, cache_dir=cache_dir, progress=progress)
    return EvalSet(data, noise, cond, uncond, guidance, reference, real, classifier)


def quality(evalset: EvalSet, samples: Tensor) -> dict[str, float]:
    """Distance of ``samples`` to the real data (FD + class accuracy, or SW + energy) and to the teacher."""
    if evalset.classifier is None:
        metrics = toy_distances(samples, evalset.data)
    else:
        metrics = {"fd": feature_fd(evalset.classifier, samples, evalset.real),
                   "accuracy": class_accuracy(evalset.classifier, samples, evalset.cond)}
    metrics["fidelity"] = fidelity(samples, evalset.reference)
    return metrics


def evaluate_sampler(evalset: EvalSet, denoiser: Denoiser, windows: TimeWindows, steps: int,
                     guidance: float = 1.0) -> dict[str, float]:
    """Score ``sample(denoiser, noise, windows, steps)`` on ``evalset``: quality, straightness, NFE, seconds."""
    start = time.perf_counter()
    out, trajectory = sample(denoiser, evalset.noise, windows, steps, evalset.cond, evalset.uncond, guidance,
                             return_trajectory=True)
    seconds = time.perf_counter() - start
    guided = guidance != 1.0 and evalset.uncond is not None
    metrics = quality(evalset, out)
    metrics.update(straightness=straightness(trajectory, trajectory_times(windows, steps)),
                   nfe=steps * (2 if guided else 1), seconds=seconds)
    metrics["samples"] = out
    return metrics


def evaluate_callable(evalset: EvalSet, sampler: NoiseToSamples, nfe: int) -> dict[str, float]:
    """Score an outside sampler (e.g. diffusers' DPM-Solver) on ``evalset`` (no straightness)."""
    start = time.perf_counter()
    with torch.no_grad():
        out = sampler(evalset.noise, evalset.cond)
    metrics = quality(evalset, out)
    metrics.update(nfe=nfe, seconds=time.perf_counter() - start, samples=out)
    return metrics
