"""Feature classifier of the built-in image sets: held-out accuracy, FD behaviour, caching."""

import pytest
import torch

import proreflow.builtin.classifier as classifier_module
from proreflow.builtin import load_dataset
from proreflow.builtin.classifier import class_accuracy, feature_fd, load_or_train_classifier


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def digits_classifier(cache):
    return load_or_train_classifier("digits", cache_dir=cache, progress=False)


def test_digits_classifier_is_accurate_on_held_out_data(digits_classifier):
    test = load_dataset("digits", "test")
    assert digits_classifier.stats["test_accuracy"] >= 0.95
    assert class_accuracy(digits_classifier, test.x, test.labels) == pytest.approx(
        digits_classifier.stats["test_accuracy"])


def test_fd_is_zero_on_itself_and_grows_with_noise(digits_classifier):
    real = load_dataset("digits", "test").x
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(real.shape, generator=g)
    fds = [feature_fd(digits_classifier, real + s * noise, real) for s in (0.0, 0.1, 0.2, 0.4, 0.8)]
    assert fds[0] == pytest.approx(0.0, abs=1e-6)
    assert all(a < b for a, b in zip(fds, fds[1:])), fds
    # held-out real images are far closer to the training images than noisy ones are
    # (FD of finite sets is biased upwards: 1438 vs 359 real images read about 0.7)
    assert feature_fd(digits_classifier, load_dataset("digits", "train").x, real) < fds[3]


def test_classifier_cache_is_reused(digits_classifier, cache, monkeypatch):
    monkeypatch.setattr(classifier_module, "fit_classifier", lambda *a, **k: pytest.fail("trained again"))
    again = load_or_train_classifier("digits", cache_dir=cache)
    assert again.path == digits_classifier.path
    for a, b in zip(digits_classifier.module.state_dict().values(), again.module.state_dict().values()):
        assert torch.equal(a, b)


def test_2d_sets_have_no_classifier():
    with pytest.raises(ValueError, match="2D dataset"):
        load_or_train_classifier("moons")


@pytest.mark.slow
def test_mnist_classifier_is_accurate_on_held_out_data(cache):
    assert load_or_train_classifier("mnist", cache_dir=cache, progress=False).stats["test_accuracy"] >= 0.95
