"""Built-in datasets: shapes, labels, ranges, splits and the exact 2D samplers."""

import math

import pytest
import torch

from proreflow.builtin import TOY_SAMPLERS, get_spec, load_dataset, sample_toy
from proreflow.builtin.images import stratified_split


@pytest.mark.parametrize("name, n, side, per_class", [("digits", 1797, 8, None), ("mnist", 5000, 28, 500)])
def test_image_sets_shapes_labels_range(name, n, side, per_class):
    data = load_dataset(name, "all")
    assert data.x.shape == (n, 1, side, side) and data.x.dtype == torch.float32
    assert data.x.min() == -1.0 and data.x.max() == 1.0
    assert data.labels.dtype == torch.int64 and set(data.labels.tolist()) == set(range(10))
    if per_class:
        assert torch.bincount(data.labels).tolist() == [per_class] * 10
    x, cond = data[3]
    assert x.shape == (1, side, side) and cond.ndim == 0 and cond.dtype == torch.int64
    assert torch.equal(data.uncond, torch.tensor([10])) and get_spec(name).num_classes == 10


def test_digits_pixel_scaling_is_linear():
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images).float()
    assert torch.allclose(load_dataset("digits", "all").x[:, 0], raw / 8 - 1)


@pytest.mark.parametrize("name", ["digits", "mnist"])
def test_image_split_is_fixed_disjoint_and_stratified(name):
    full, train, test = (load_dataset(name, s) for s in ("all", "train", "test"))
    assert len(train) + len(test) == len(full)
    assert abs(len(test) / len(full) - 0.2) < 0.01
    counts = torch.bincount(test.labels, minlength=10).float() / torch.bincount(full.labels, minlength=10)
    assert ((counts - 0.2).abs() < 0.02).all()
    train_idx, test_idx = stratified_split(full.labels, 0.2)
    assert set(train_idx.tolist()).isdisjoint(test_idx.tolist())
    assert sorted(train_idx.tolist() + test_idx.tolist()) == list(range(len(full)))
    assert torch.equal(full.x[test_idx], test.x) and torch.equal(full.labels[train_idx], train.labels)
    assert torch.equal(load_dataset(name, "test").x, test.x)  # the same split every time


@pytest.mark.parametrize("name", sorted(TOY_SAMPLERS))
def test_2d_sets(name):
    data = load_dataset(name, "train", size=1000, seed=3)
    assert data.x.shape == (1000, 2) and data.labels is None and data.uncond is None
    x, cond = data[0]
    assert x.shape == (2,) and cond is None
    assert torch.equal(load_dataset(name, "train", size=1000, seed=3).x, data.x)
    assert not torch.equal(load_dataset(name, "test", size=1000, seed=3).x, data.x)
    assert len(load_dataset(name)) == 50_000
    assert 0.5 < data.x.std() < 2.0  # roughly unit scale, what a VP diffusion expects


def test_checkerboard_is_uniform_on_the_dark_squares():
    x = sample_toy("checkerboard", 40_000, seed=0)
    assert x.min() >= -2 and x.max() <= 2
    i, j = (x + 2).floor().long().unbind(1)
    assert ((i + j) % 2 == 0).all()
    counts = torch.bincount(i * 4 + j, minlength=16)[(torch.arange(16) // 4 + torch.arange(16) % 4) % 2 == 0]
    assert ((counts / 40_000 - 1 / 8).abs() < 0.01).all()


def test_eight_gaussians_modes_and_spread():
    x = sample_toy("8gaussians", 40_000, seed=0)
    angles = torch.arange(8) * math.pi / 4
    centres = 2 * torch.stack([angles.cos(), angles.sin()], 1)
    d2 = torch.cdist(x, centres).min(dim=1).values ** 2
    assert abs(d2.mean() - 2 * 0.15**2) < 0.002  # E|N(0, s^2 I_2)|^2 = 2 s^2
    assert ((torch.bincount(torch.cdist(x, centres).argmin(1), minlength=8) / 40_000 - 1 / 8).abs() < 0.01).all()


def test_two_moons_is_centred():
    x = sample_toy("moons", 100_000, seed=0)
    assert x.mean(0).abs().max() < 0.02  # the moons' mean (0.5, 0.25) is subtracted


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown built-in dataset"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "validation")
    with pytest.raises(ValueError, match="2D datasets only"):
        load_dataset("digits", size=10)
    with pytest.raises(ValueError, match="unknown 2D distribution"):
        sample_toy("spiral", 10)

