"""Feature classifier of a built-in image set: its FD (Frechet distance in the classifier's
penultimate feature space, the analogue of FID) and the class accuracy of conditional samples
(the analogue of CLIP score).

The classifier (:class:`proreflow.builtin.SmallClassifier`) is trained with cross-entropy on
the ``train`` split of the real data, reports its accuracy on the held-out ``test`` split,
and is cached like a teacher under ``<cache>/classifiers/<data>-<hash of config>/``.
Samples are clamped to the data range [-1, 1] before they are classified.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..evaluation.frechet import frechet_distance
from .data import get_spec, load_dataset
from .fitting import fit_record, fit_steps
from .networks import build_network
from .store import load_or_fit

KIND = "classifiers"
FORMAT = 1


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that determines a trained feature classifier (its hash names the cache entry)."""

    data: str
    steps: int
    width: int
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-2
    feature_dim: int = 64
    seed: int = 0

    @property
    def network(self) -> dict[str, Any]:
        spec = get_spec(self.data)
        return {"class": "SmallClassifier", "kwargs": {"in_channels": spec.shape[0], "num_classes": spec.num_classes,
                                                       "width": self.width, "feature_dim": self.feature_dim}}

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "format": FORMAT}


DEFAULTS: dict[str, dict[str, Any]] = {"digits": dict(steps=300, width=32), "mnist": dict(steps=600, width=16)}


def classifier_config(data: str, **overrides: Any) -> ClassifierConfig:
    """The default classifier config of image set ``data`` with ``overrides`` (None values ignored)."""
    if get_spec(data).is_2d:
        raise ValueError(f"{data!r} is a 2D dataset: compare samples with evaluation.toy_distances instead")
    return ClassifierConfig(data, **{**DEFAULTS[data], **{k: v for k, v in overrides.items() if v is not None}})


@torch.no_grad()
def _batched(fn, images: Tensor, batch_size: int = 512) -> Tensor:
    return torch.cat([fn(images[i:i + batch_size].clamp(-1, 1)) for i in range(0, len(images), batch_size)])


@dataclass
class TrainedClassifier:
    """A feature classifier (eval mode, frozen, cpu) with its config, cache entry and stats."""

    module: nn.Module
    config: ClassifierConfig
    path: Path
    stats: dict[str, Any] = field(default_factory=dict)

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features ``(N, feature_dim)`` of ``(N, C, H, W)`` images."""
        return _batched(self.module.features, images.float().cpu())

    def predict(self, images: Tensor) -> Tensor:
        """Predicted class of each image ``(N,)``."""
        return _batched(self.module, images.float().cpu()).argmax(dim=1)


def fit_classifier(config: ClassifierConfig, device: str | torch.device = "cpu", progress: bool = True
                   ) -> tuple[nn.Module, dict[str, Any]]:
    """Train a classifier on the ``train`` split; stats hold its held-out ``test_accuracy``."""
    train = load_dataset(config.data, "train")
    x_all, y_all = train.x.to(device), train.labels.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_network(config.network).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # torch's one-cycle schedule: the cached classifiers were trained with it (diffusers' named schedules lack it)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps)
    gen = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    fit_steps(model, lambda idx: F.cross_entropy(model(x_all[idx]), y_all[idx]), opt, sched, steps=config.steps,
              batch_size=config.batch_size, size=len(x_all), generator=gen, device=device,
              desc=f"classifier {config.data}", progress=progress)
    model = model.cpu().eval().requires_grad_(False)
    test = load_dataset(config.data, "test")
    accuracy = float((_batched(model, test.x).argmax(dim=1) == test.labels).float().mean())
    return model, {"test_accuracy": accuracy, "train_seconds": round(time.perf_counter() - start, 2),
                   **fit_record(device)}


def load_or_train_classifier(data: str, *, cache_dir: str | os.PathLike | None = None, force: bool = False,
                             device: str | torch.device = "cpu", progress: bool = True,
                             **overrides: Any) -> TrainedClassifier:
    """The cached feature classifier of image set ``data`` (default config + overrides), or train it."""
    config = classifier_config(data, **overrides)
    entry = load_or_fit(KIND, data, config.to_dict(), config.network,
                        lambda: fit_classifier(config, device, progress), cache_dir, force)
    return TrainedClassifier(entry.module, config, entry.path, entry.record["stats"])


def feature_fd(classifier: TrainedClassifier, samples: Tensor, reference: Tensor) -> float:
    """FD between ``samples`` and ``reference`` images in the classifier's feature space."""
    return frechet_distance(classifier.features(samples), classifier.features(reference))


def class_accuracy(classifier: TrainedClassifier, samples: Tensor, labels: Tensor) -> float:
    """Fraction of ``samples`` that the classifier assigns to the class they were generated for."""
    return float((classifier.predict(samples) == labels.cpu().reshape(-1)).float().mean())
