"""Teacher training on built-in data: config, cache (save, reload, reuse), setup, command line."""

import pytest
import torch

import proreflow.builtin.teacher as teacher_module
from proreflow import TimeWindows, VPSchedule, sample
from proreflow.builtin import get_spec, load_dataset
from proreflow.builtin.distributions import toy_distances
from proreflow.builtin.teacher import (
    builtin_setup,
    load_or_train_teacher,
    teacher_config,
    train_teacher,
)
from proreflow.cli import main
from proreflow.training.setup import DistillationSetup
from proreflow.training.student import student_module

TINY_2D = {"class": "MLPDenoiser", "kwargs": {"shape": [2], "num_classes": 0, "width": 16, "depth": 1}}
TINY_DIGITS = {"class": "MLPDenoiser", "kwargs": {"shape": [1, 8, 8], "num_classes": 10, "width": 16, "depth": 1}}


def no_training(monkeypatch):
    monkeypatch.setattr(teacher_module, "fit_teacher", lambda *a, **k: pytest.fail("trained again"))


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_config_defaults_and_overrides():
    config = teacher_config("digits", steps=7, lr=None)
    assert config.steps == 7 and config.lr == teacher_module.DEFAULTS["digits"]["lr"]
    assert config.cond_dropout == 0.1 and config.beta_schedule == "scaled_linear"
    assert torch.equal(config.schedule().alphas_cumprod, VPSchedule.from_betas("scaled_linear").alphas_cumprod)
    with pytest.raises(TypeError, match="unknown teacher setting"):
        teacher_config("digits", learning_rate=1.0)
    with pytest.raises(ValueError, match="unknown built-in dataset"):
        teacher_config("cifar")


def test_trained_teacher_saves_reloads_bit_identically_and_is_reused(tmp_path, monkeypatch):
    trained = train_teacher("digits", steps=3, network=TINY_DIGITS, cache_dir=tmp_path, progress=False)
    assert trained.trained and trained.path.parent == tmp_path / "teachers"
    assert trained.path.name.startswith("digits-")
    assert sorted(p.name for p in trained.path.iterdir()) == ["config.json", "model.safetensors"]
    assert trained.stats["train_seconds"] >= 0
    no_training(monkeypatch)
    again = load_or_train_teacher("digits", steps=3, network=TINY_DIGITS, cache_dir=tmp_path)
    assert not again.trained and again.path == trained.path and same_weights(trained.module, again.module)
    assert not any(p.requires_grad for p in again.module.parameters())


def test_training_is_reproducible_and_config_changes_retrain(tmp_path):
    first = train_teacher("moons", steps=5, network=TINY_2D, cache_dir=tmp_path, progress=False)
    second = train_teacher("moons", steps=5, network=TINY_2D, cache_dir=tmp_path / "b", progress=False)
    assert same_weights(first.module, second.module)
    # what besides the config decides the bits (fitting's module doc) is in the record
    assert {k: first.stats[k] for k in ("device", "torch", "threads")} == {
        "device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads()}
    other = load_or_train_teacher("moons", steps=5, network=TINY_2D, seed=1, cache_dir=tmp_path, progress=False)
    assert other.trained and other.path != first.path
    forced = load_or_train_teacher("moons", steps=5, network=TINY_2D, cache_dir=tmp_path, force=True, progress=False)
    assert forced.trained and forced.path == first.path


def test_offset_noise_is_for_images_only(tmp_path):
    with pytest.raises(ValueError, match="image datasets only"):
        train_teacher("moons", steps=1, network=TINY_2D, offset_noise=0.1, cache_dir=tmp_path, progress=False)
    assert teacher_config("mnist").offset_noise == 0.1 and teacher_config("digits").offset_noise == 0.0


def test_cache_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PROREFLOW_CACHE", str(tmp_path))
    trained = load_or_train_teacher("moons", steps=2, network=TINY_2D, progress=False)
    assert trained.path.parent == tmp_path / "teachers"


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_teacher_learns_the_2d_distribution(kind, tmp_path):
    # a wrong objective (sign, scale, time convention, path) leaves the DDIM / Euler samples far from the data
    net = {"class": "MLPDenoiser", "kwargs": {"shape": [2], "num_classes": 0, "width": 64, "depth": 2}}
    trained = train_teacher("8gaussians", teacher=kind, steps=800, batch_size=256, network=net, cache_dir=tmp_path,
                            progress=False)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    x = sample(trained.denoiser(), noise, TimeWindows(32), 32)
    assert toy_distances(x, "8gaussians", n_true=2000)["energy_distance"] < 0.15


def test_builtin_setup_for_the_engine(tmp_path):
    setup = builtin_setup("digits", steps=2, network=TINY_DIGITS, cache_dir=tmp_path, progress=False)
    assert isinstance(setup, DistillationSetup) and setup.prediction_type == "epsilon"
    assert torch.equal(setup.uncond, torch.tensor([10])) and setup.make_student is None
    assert len(setup.dataset) == 1438 and setup.info["data"] == "digits"
    x0, label = setup.dataset[0]
    denoiser = setup.denoiser(student_module(setup, False))
    out = denoiser.predict(x0[None].repeat(4, 1, 1, 1), torch.tensor(0.3), label.repeat(4), setup.uncond, 2.0)
    assert out.shape == (4, 1, 8, 8)
    scratch = builtin_setup("digits", steps=2, network=TINY_DIGITS, cache_dir=tmp_path, from_scratch=True)
    assert not same_weights(student_module(scratch, True), setup.teacher_model)
    moons = builtin_setup("moons", steps=2, network=TINY_2D, cache_dir=tmp_path, progress=False)
    assert moons.uncond is None and moons.dataset[0][1] is None


def test_mnist_unet_teacher_round_trip(tmp_path, monkeypatch):
    unet = {**teacher_module.DEFAULTS["mnist"]["network"]}
    trained = train_teacher("mnist", steps=1, batch_size=4, network=unet, cache_dir=tmp_path, progress=False)
    assert type(trained.module).__name__ == "UNet2DModel"
    no_training(monkeypatch)
    setup = builtin_setup("mnist", steps=1, batch_size=4, network=unet, cache_dir=tmp_path)
    assert same_weights(trained.module, setup.teacher_model)
    x = sample(setup.denoiser(setup.teacher_model), torch.randn(2, 1, 28, 28), TimeWindows(2), 2,
               torch.tensor([3, 7]), setup.uncond, 2.0)
    assert x.shape == (2, 1, 28, 28) and torch.isfinite(x).all()


def test_registered_setup_builds_the_builtin_setup(tmp_path):
    setups = pytest.importorskip("proreflow.commands.named_setups")
    setup = setups.build_setup({"name": "moons", "steps": 2, "network": TINY_2D, "cache_dir": str(tmp_path),
                                "progress": False})
    assert setup.info["data"] == "moons"


def test_teacher_command(tmp_path, capsys):
    args = ["teacher", "--data", "moons", "--steps", "3", "--cache-dir", str(tmp_path), "--quiet", "--threads", "1"]
    assert main(args) == 0
    assert "trained in" in capsys.readouterr().out
    assert main(args + ["--eval", "--samples", "500"]) == 0
    out = capsys.readouterr().out
    assert "reused from the cache" in out and "energy_distance" in out and "500 samples" in out
    assert main(args + ["--force"]) == 0 and "trained in" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["checkerboard", "8gaussians", "moons"])
def test_default_2d_teachers_are_good(name, tmp_path):
    trained = load_or_train_teacher(name, cache_dir=tmp_path, progress=False)
    noise = torch.randn(10_000, 2, generator=torch.Generator().manual_seed(0))
    x = sample(trained.denoiser(), noise, TimeWindows(32), 32)
    assert toy_distances(x, name)["energy_distance"] < 0.06


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits", "mnist"])
def test_default_image_teachers_are_good(name, tmp_path):
    # measured with guidance 2: digits accuracy 1.0, FD 1.5; MNIST 0.97, FD 1.1 (real vs real: 0.7, 0.15)
    from proreflow.builtin.classifier import class_accuracy, feature_fd, load_or_train_classifier

    trained = load_or_train_teacher(name, cache_dir=tmp_path, progress=False)
    labels = torch.arange(1000) % 10
    noise = torch.randn(1000, *get_spec(name).shape, generator=torch.Generator().manual_seed(0))
    x = sample(trained.denoiser(), noise, TimeWindows(32), 32, labels, torch.tensor([10]), 2.0)
    classifier = load_or_train_classifier(name, cache_dir=tmp_path, progress=False)
    assert class_accuracy(classifier, x, labels) >= 0.9
    assert feature_fd(classifier, x, load_dataset(name, "all").x) < 2.5
