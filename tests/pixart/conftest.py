"""Session fixtures: the tiny PixArt pipelines, built once."""

from __future__ import annotations

import pytest
from sd.conftest import image_dir  # noqa: F401 (the image-caption folder)

from .tiny import save_tiny_pixart


@pytest.fixture(scope="session")
def alpha_dir(tmp_path_factory):
    """PixArt-alpha-1024-style: size conditions, learned variance, epsilon."""
    return save_tiny_pixart(tmp_path_factory.mktemp("pixart-alpha") / "pipe", "alpha")


@pytest.fixture(scope="session")
def sigma_dir(tmp_path_factory):
    """PixArt-Sigma-style with v-prediction and out_channels = in_channels."""
    return save_tiny_pixart(tmp_path_factory.mktemp("pixart-sigma") / "pipe", "sigma")
