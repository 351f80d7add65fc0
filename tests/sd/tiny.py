"""Tiny random Stable Diffusion pipelines built offline, saved like real ones.

SD1.5-style: CLIP text encoder (32-dim states), 2-level UNet with cross-attention, 2-level VAE
(factor 2, so 16 px images <-> 4 x 8 x 8 latents). SDXL-style: two text encoders (the second
with a projection, giving the pooled embedding), UNet with ``addition_embed_type="text_time"``.
The tokenizer's vocabulary is written here: every letter and digit, with and without the
end-of-word mark, and a few merges.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HIDDEN = 32
MAX_TOKENS = 16


def tokenizer():
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for c in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def text_encoder(vocab_size: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                            projection_dim=HIDDEN, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                            pad_token_id=vocab_size - 1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=16)


def scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         prediction_type=prediction_type, steps_offset=1)


def save_tiny_sd15(path: Path, prediction_type: str = "epsilon") -> Path:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tok = tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN, attention_head_dim=8, norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=vae(), text_encoder=text_encoder(len(tok)), tokenizer=tok, unet=unet,
                                   scheduler=scheduler(prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def save_tiny_sdxl(path: Path) -> Path:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tok = tokenizer()
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * HIDDEN, attention_head_dim=8, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=HIDDEN + 6 * time_dim)
    pipe = StableDiffusionXLPipeline(vae=vae(), text_encoder=text_encoder(len(tok)),
                                     text_encoder_2=text_encoder(len(tok), with_projection=True),
                                     tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=scheduler())
    pipe.save_pretrained(path)
    return path


CAPTIONS = ["a cat", "a dog", "a red cat", "a dog 2", "a cat on a mat", "two dogs"]


def write_image_folder(path: Path, corrupt: bool = True, metadata: bool = False) -> Path:
    """Captioned random images of several sizes; with ``corrupt``, one truncated JPEG among them."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        h, w = (40, 56) if i % 2 else (48, 36)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": caption})
        if not metadata:
            (path / f"img{i}.txt").write_text(caption + "\n")
    if corrupt:
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path / "broken.jpg")
        data = (path / "broken.jpg").read_bytes()
        (path / "broken.jpg").write_bytes(data[: len(data) // 2])  # truncated
        rows.append({"file_name": "broken.jpg", "text": "a broken image"})
        if not metadata:
            (path / "broken.txt").write_text("a broken image\n")
    if metadata:
        import json

        (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
