"""FID: the TF-Inception file, clean-fid resizing, statistics through torchmetrics, the on-disk cache."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from proreflow.sd import fid as fid_module
from proreflow.sd.fid import (
    FID,
    FIDStats,
    InceptionFeatures,
    clean_resize,
    default_inception_path,
    reference_statistics,
)


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n random blocky RGB images in [0, 1] (8 x 8 blocks upsampled)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 8, 8, generator=g)
    return base.repeat_interleave(size // 8, 2).repeat_interleave(size // 8, 3)


def noisy(images: torch.Tensor, sigma: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (images + sigma * torch.randn(images.shape, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures()


def test_default_network_is_the_tf_inception_of_fid_helper(inception):
    images = torch.zeros(3, 3, 299, 299, dtype=torch.uint8)
    images[0] = images[1] = torch.randint(0, 256, (3, 299, 299), generator=torch.Generator().manual_seed(0))
    images[2] = 128
    features = inception(images)
    assert default_inception_path().name == "default_1.pt" and inception.num_features == 2048
    assert features.shape == (3, 2048)
    assert torch.equal(features[0], features[1])
    assert not torch.allclose(features[0], features[2])
    # float in [0, 1] means uint8 / 255: the same network input, (u - 128) / 128
    torch.testing.assert_close(inception(images[:1].float() / 255), features[:1], rtol=1e-5, atol=1e-5)


def test_network_sees_the_tf_input_range(feature_file):
    seen = {}
    net = InceptionFeatures(feature_file)
    original = net.net

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return original(x)

    net.net = Spy()
    net(torch.tensor([0, 128, 255], dtype=torch.uint8).reshape(1, 3, 1, 1).expand(1, 3, 299, 299).contiguous())
    assert seen["x"][0, :, 0, 0].tolist() == [-1.0, 0.0, 127 / 128]  # fid_helper's INPUT_RANGE_TF = (-1, 0.9921875)


def test_missing_or_broken_network_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        InceptionFeatures(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="bad.pt"):
        InceptionFeatures(bad)


def test_clean_resize_is_pil_bicubic_without_requantising():
    # a smooth image (no overshoot, which PIL's 8-bit path clips between its two passes)
    y, x = torch.meshgrid(torch.linspace(0, 3, 64), torch.linspace(0, 2, 48), indexing="ij")
    waves = torch.stack([torch.sin(x + y), torch.cos(2 * x - y), torch.sin(x * y)])
    u8 = (128 + 100 * torch.stack([waves, waves.flip(1)])).round().to(torch.uint8)
    resized = clean_resize(u8)
    assert resized.shape == (2, 3, 299, 299) and resized.dtype == torch.float32
    # PIL's own 8-bit bicubic resize agrees up to its rounding after each of its two passes
    pil = np.stack([np.asarray(Image.fromarray(img.permute(1, 2, 0).numpy()).resize((299, 299), Image.BICUBIC))
                    for img in u8])
    ours = resized.permute(0, 2, 3, 1).numpy() * 255
    assert np.abs(ours - pil).max() <= 1.5
    assert not np.allclose(ours, np.round(ours))  # float mode: not quantised again
    flat = clean_resize(torch.full((1, 3, 40, 50), 77, dtype=torch.uint8))
    torch.testing.assert_close(flat, torch.full_like(flat, 77 / 255))


def test_stats_match_closed_forms(feature_file):
    fid = FID(feature_file)
    images = smooth_images(12)
    stats = fid.statistics([images[:5], images[5:]])
    features = fid.extractor(clean_resize(images)).double()
    torch.testing.assert_close(stats.mu, features.mean(0))
    torch.testing.assert_close(stats.sigma, torch.cov(features.T))
    assert stats.n == 12
    # Fréchet distance of diagonal Gaussians: |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    d = fid.extractor.num_features
    s1, s2 = torch.linspace(0.5, 2, d, dtype=torch.float64), torch.linspace(1, 3, d, dtype=torch.float64)
    a = FIDStats(torch.zeros(d, dtype=torch.float64), torch.diag(s1), 10)
    b = FIDStats(torch.full((d,), 0.5, dtype=torch.float64), torch.diag(s2), 20)
    expected = d * 0.25 + float(((s1.sqrt() - s2.sqrt()) ** 2).sum())
    assert math.isclose(fid.distance(a, b), expected, rel_tol=1e-9)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(feature_file):
    fid = FID(feature_file)
    images = smooth_images(16)
    clean = fid.statistics([images])
    assert abs(fid.distance(clean, clean)) < 1e-6
    scores = [fid.distance(clean, fid.statistics([noisy(images, s)])) for s in (0.02, 0.05, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in zip(scores, scores[1:])), scores


@pytest.mark.slow
def test_real_inception_fid_self_and_noise(inception):
    """The same checks with the 2048-feature TF-Inception (each distance ~35 s on 2 CPU cores)."""
    fid = FID(inception)
    images = smooth_images(16, 64)
    clean = fid.statistics([images])
    assert abs(fid.distance(clean, clean)) < 1e-3
    scores = [fid.distance(clean, fid.statistics([noisy(images, s)])) for s in (0.05, 0.2)]
    assert 0 < scores[0] < scores[1], scores


def write_pngs(folder, images: torch.Tensor) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate((images * 255).round().to(torch.uint8)):
        paths.append(folder / f"{i}.png")
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(paths[-1])
    return paths


def test_cached_reference_stats_equal_fresh_ones(feature_file, tmp_path, monkeypatch):
    fid = FID(feature_file)
    paths = write_pngs(tmp_path / "real", smooth_images(6, 32))
    cache = tmp_path / "cache"
    first = reference_statistics(fid, paths, image_size=24, cache_dir=cache, description="six squares")
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    fresh = reference_statistics(fid, paths, image_size=24, cache_dir=None)
    assert torch.equal(first.mu, fresh.mu) and torch.equal(first.sigma, fresh.sigma) and first.n == fresh.n == 6

    def no_compute(*args, **kwargs):
        raise AssertionError("the cache was not used")

    with monkeypatch.context() as m:
        m.setattr(FID, "statistics", no_compute)
        cached = reference_statistics(fid, paths, image_size=24, cache_dir=cache)
    assert torch.equal(cached.mu, fresh.mu) and torch.equal(cached.sigma, fresh.sigma) and cached.n == 6
    # other settings or other files: another cache entry
    reference_statistics(fid, paths, image_size=32, cache_dir=cache)
    reference_statistics(fid, paths[:5], image_size=24, cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 3
    # the real-image preparation: center crop + resize, as the generated images' size
    assert fid_module.load_reference_image(paths[0], 24).shape == (3, 24, 24)


def test_reference_errors_name_the_file_and_unreadable_images_are_skipped(feature_file, tmp_path, caplog):
    fid = FID(feature_file)
    paths = write_pngs(tmp_path / "real", smooth_images(3))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        reference_statistics(fid, [*paths, tmp_path / "missing.png"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        skipped = reference_statistics(fid, [broken, *paths, empty], batch_size=2)
    assert "1 skipped so far" in caplog.text and "2 skipped so far" in caplog.text
    assert "2 of 5 images unreadable and skipped" in caplog.text
    readable = reference_statistics(fid, paths)  # an unreadable image is skipped (as training skips it)
    assert skipped.n == readable.n == 3
    torch.testing.assert_close(skipped.mu, readable.mu, rtol=0, atol=0)
    torch.testing.assert_close(skipped.sigma, readable.sigma, rtol=0, atol=1e-12)
