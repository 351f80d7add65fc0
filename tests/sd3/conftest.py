"""Session fixtures: the tiny SD3 pipeline, built once."""

from __future__ import annotations

import pytest
from sd.conftest import image_dir  # noqa: F401 (the image-caption folder)
from sd.t2i_fixtures import feature_file  # noqa: F401 (the FID network's stand-in)

from .tiny import save_tiny_sd3


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "pipe")


@pytest.fixture(scope="session")
def sd3_dynamic_dir(tmp_path_factory):
    """FLUX-style dynamic shifting (mu from the image sequence length) on the SD3 pipeline."""
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3dyn") / "pipe", use_dynamic_shifting=True)
