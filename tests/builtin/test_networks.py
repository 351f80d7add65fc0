"""Small networks, their specs, and the cache of trained small models."""

import json

import pytest
import torch

from proreflow import Denoiser, VPSchedule
from proreflow.builtin import (
    MLPDenoiser,
    SmallClassifier,
    adapter_for_spec,
    build_network,
    cache_root,
    config_hash,
    entry_dir,
    load_entry,
    load_or_fit,
    mlp_spec,
    save_entry,
    small_unet,
)
from proreflow.builtin.networks import timestep_embedding


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0.0, 500.0]), 8)
    assert emb.shape == (2, 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.allclose(emb[1, 0], torch.cos(torch.tensor(500.0)))  # frequency 1 first


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)])
def test_mlp_denoiser_shapes_and_zero_start(shape):
    net = MLPDenoiser(shape, num_classes=10, width=32, depth=2)
    x, t = torch.randn(5, *shape), torch.rand(5) * 999
    out = net(x, t, torch.arange(5))
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))  # output layer starts at zero


def test_mlp_conditioning():
    torch.manual_seed(0)
    net = MLPDenoiser((1, 8, 8), num_classes=10, width=32, depth=2)
    torch.nn.init.normal_(net.out[-1].weight)
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 300.0)
    null = torch.full((4,), 10)
    assert torch.equal(net(x, t, None), net(x, t, null))  # None means the null class
    assert not torch.allclose(net(x, t, torch.zeros(4, dtype=torch.long)), net(x, t, null))
    assert torch.allclose(net(x, t[:1], null), net(x, t, null))  # a scalar-like timestep broadcasts
    with pytest.raises(ValueError, match="unconditional"):
        MLPDenoiser((2,))(torch.randn(3, 2), torch.rand(3), torch.zeros(3, dtype=torch.long))


def test_unet_spec_takes_28x28_class_conditional_images_with_guidance():
    spec = small_unet(10)
    unet = build_network(spec)
    assert type(unet).__name__ == "UNet2DModel" and unet.config.num_class_embeds == 11
    denoiser = Denoiser(adapter_for_spec(spec)(unet), "epsilon", VPSchedule.from_betas())
    x = torch.randn(3, 1, 28, 28)
    out = denoiser.predict(x, torch.tensor(0.5), torch.tensor([1, 2, 3]), torch.tensor([10]), guidance=2.0)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_classifier_shapes():
    clf = SmallClassifier(num_classes=10, width=16, feature_dim=24)
    for side in (8, 28):
        x = torch.randn(6, 1, side, side)
        assert clf.features(x).shape == (6, 24) and clf(x).shape == (6, 10)


def test_build_network_rejects_unknown_class():
    with pytest.raises(ValueError, match="unknown network class"):
        build_network({"class": "Transformer", "kwargs": {}})
    assert isinstance(build_network(json.loads(json.dumps(mlp_spec((2,))))), MLPDenoiser)  # JSON round trip


def test_config_hash_is_canonical():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2}) and len(config_hash({})) == 12


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("PROREFLOW_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("PROREFLOW_CACHE")
    assert cache_root().parts[-2:] == (".cache", "proreflow")
    assert entry_dir("teachers", "moons", {"x": 1}, tmp_path).parent == tmp_path / "teachers"


def test_save_and_load_are_bit_identical_and_atomic(tmp_path):
    spec = mlp_spec((2,), width=16, depth=1)
    torch.manual_seed(0)
    net = build_network(spec)
    torch.nn.init.normal_(net.out[-1].weight)
    assert load_entry(tmp_path / "entry") is None
    save_entry(tmp_path / "entry", net, {"network": spec, "note": "x"})
    assert sorted(p.name for p in (tmp_path / "entry").iterdir()) == ["config.json", "model.safetensors"]
    loaded, record = load_entry(tmp_path / "entry")
    assert record["note"] == "x" and not any(p.requires_grad for p in loaded.parameters())
    for (k, a), (k2, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    (tmp_path / "entry" / "config.json").unlink()  # an entry without its record is incomplete
    assert load_entry(tmp_path / "entry") is None
    with pytest.raises(ValueError, match="network spec"):
        save_entry(tmp_path / "other", net, {})


def test_load_or_fit_fits_once(tmp_path):
    spec, calls = mlp_spec((2,), width=8, depth=1), []

    def fit():
        calls.append(1)
        return build_network(spec), {"seconds": 0}

    first = load_or_fit("things", "moons", {"k": 1}, spec, fit, tmp_path)
    second = load_or_fit("things", "moons", {"k": 1}, spec, fit, tmp_path)
    assert (first.fitted, second.fitted, len(calls)) == (True, False, 1)
    assert first.path == second.path and second.record["stats"] == {"seconds": 0}
    assert load_or_fit("things", "moons", {"k": 1}, spec, fit, tmp_path, force=True).fitted and len(calls) == 2
    assert load_or_fit("things", "moons", {"k": 2}, spec, fit, tmp_path).path != first.path
