"""CLIP score with a tiny random CLIPModel saved like a real one."""

from __future__ import annotations

import pytest
import torch

from proreflow.sd.clip_score import ClipScorer


def test_clip_score_is_clamped_100_cosine_of_clip_forward(clip_dir):
    scorer = ClipScorer.load(clip_dir)
    images = torch.randint(0, 256, (4, 3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    captions = ["a cat", "a dog on a mat", "red", "two dogs, a cat and a very long caption " * 4]
    scores = scorer.score(images, captions)
    assert scores.shape == (4,) and bool((scores >= 0).all()) and bool((scores <= 100).all())
    # the true answer through CLIPModel.forward: logits = exp(logit_scale) * cos
    proc = scorer.processor
    text = proc.tokenizer(captions, padding=True, truncation=True, max_length=16, return_tensors="pt")
    pixels = proc.image_processor(images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt")
    with torch.no_grad():
        out = scorer.model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                           pixel_values=pixels["pixel_values"])
    cosine = out.logits_per_image.diagonal() / scorer.model.logit_scale.exp()
    torch.testing.assert_close(scores, (100 * cosine).clamp(min=0), rtol=1e-4, atol=1e-4)
    # per pair: independent of the batch it is scored in; float [0, 1] images are the same images
    torch.testing.assert_close(scorer.score(images[2:3], captions[2:3]), scores[2:3])
    torch.testing.assert_close(scorer.score(images.float() / 255, captions), scores)
    with pytest.raises(ValueError, match="4 images but 1 captions"):
        scorer.score(images, captions[:1])


def test_missing_clip_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-clip-here"):
        ClipScorer.load(tmp_path / "no-clip-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*save_pretrained"):
        ClipScorer.load(tmp_path / "empty")
