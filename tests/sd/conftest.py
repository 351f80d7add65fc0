"""Session fixtures: the tiny SD1.5 / SDXL pipelines and an image folder, built once."""

from __future__ import annotations

import pytest

from .t2i_fixtures import clip_dir, feature_file, make_coco, student_dir, teacher_dir  # noqa: F401 (text-to-image evaluation)
from .tiny import save_tiny_sd15, save_tiny_sdxl, write_image_folder


@pytest.fixture(scope="session")
def sd15_dir(tmp_path_factory):
    return save_tiny_sd15(tmp_path_factory.mktemp("sd15") / "pipe")


@pytest.fixture(scope="session")
def sd2v_dir(tmp_path_factory):
    """SD2.x-style: v_prediction."""
    return save_tiny_sd15(tmp_path_factory.mktemp("sd2v") / "pipe", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "pipe")


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images") / "data")

