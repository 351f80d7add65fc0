"""Fixtures of the evaluation tests: tiny offline stand-ins for every outside model, built once.

- a tiny TorchScript feature network (the role of the TF-Inception file, 64 features),
- a tiny random CLIP model with its processor, saved like a real one,
- the tiny SD1.5 pipeline of ``tests/sd/tiny.py`` as teacher, and its weights exported as a
  2-window student (``proreflow.sd.export.export_pipeline``),
- a COCO-format captions file with its image folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sd.tiny import save_tiny_sd15, tokenizer


class TinyFeatures(nn.Module):
    """A fixed random conv + 4x4 average pooling: N x 3 x 299 x 299 in [-1, 1) -> N x 64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, kernel_size=9, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 4).flatten(1)


@pytest.fixture(scope="session")
def feature_file(tmp_path_factory) -> Path:
    """TinyFeatures as a TorchScript file, loadable wherever an Inception file is."""
    path = tmp_path_factory.mktemp("features") / "tiny_features.pt"
    torch.jit.script(TinyFeatures().eval()).save(str(path))
    return path


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    """A random CLIPModel (32 px images, 16-dim projections) and its processor, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tokenizer()
    n = len(tok)
    config = CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=n - 2, eos_token_id=n - 1,
                         pad_token_id=n - 1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    return save_tiny_sd15(tmp_path_factory.mktemp("teacher") / "pipe")


@pytest.fixture(scope="session")
def student_dir(teacher_dir, tmp_path_factory) -> Path:
    """The teacher's weights exported as a 2-window student sampled at guidance 2 (`proreflow export`)."""
    from proreflow.sd.export import export_pipeline
    from proreflow.sd.pipeline import load_teacher

    teacher = load_teacher(teacher_dir)
    return export_pipeline(teacher.unet, teacher, tmp_path_factory.mktemp("student") / "pipe", num_windows=2,
                           guidance=2.0)


CAPTIONS = ["a cat", "a dog", "a red cat", "two dogs", "a cat on a mat", "a dog 2", "red", "a cat, a dog"]


def write_coco(root: Path, images: int = 6, captions_per_image: int = 2) -> tuple[Path, Path]:
    """A COCO captions file (non-sequential ids, several captions each) and its folder of odd-sized images."""
    folder = root / "val"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = {"images": [], "annotations": []}
    for k in range(images):
        image_id = 1000 + 7 * k
        name = f"COCO_val_{image_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (40 + 4 * (k % 3), 48, 3), dtype=np.uint8)).save(folder / name)
        data["images"].append({"id": image_id, "file_name": name, "height": 40, "width": 48})
        for c in range(captions_per_image):
            caption = CAPTIONS[(k + c) % len(CAPTIONS)]
            data["annotations"].append({"id": len(data["annotations"]), "image_id": image_id, "caption": caption})
    annotations = root / "captions_val.json"
    annotations.write_text(json.dumps(data))
    return annotations, folder


@pytest.fixture
def make_coco(tmp_path):
    """``make_coco(images=6, captions_per_image=2) -> (annotation file, image folder)`` under tmp_path."""
    return lambda images=6, captions_per_image=2: write_coco(tmp_path / "coco", images, captions_per_image)

