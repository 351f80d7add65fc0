"""Tiny random PixArt pipelines built offline and saved like real ones.

A T5 encoder from a config (32-dim states, one layer) with a T5 tokenizer built in memory from a
word list: no T5 vocabulary ships offline (``spiece.model`` / ``tokenizer.json`` of t5-v1_1 are
hub downloads), so the unigram vocabulary is T5's special tokens and the words of the test captions
(``T5Tokenizer(vocab=[(piece, score), ...])``, transformers 5; it saves a ``tokenizer.json`` that
stock transformers loads back). A ``PixArtTransformer2DModel`` with one block (patch 2, inner dim 24:
the size embeddings take a third each), the SD-style VAE of the Stable Diffusion tests (factor 2:
16 px <-> 4 x 8 x 8) and PixArt's scheduler (the released pipelines' DPMSolverMultistepScheduler on
linear betas 0.0001 .. 0.02).

- PixArt-alpha-1024-style: ``sample_size = 128`` (so the transformer and the pipeline use the
  resolution / aspect-ratio micro-conditions), learned variance (``out_channels = 2 * in_channels``),
  epsilon prediction;
- PixArt-Sigma-style with v-prediction and ``out_channels = in_channels`` (the other branch).
"""

from __future__ import annotations

from pathlib import Path

import torch
from sd.tiny import CAPTIONS, vae

HIDDEN = 32
WORDS = sorted({word for caption in CAPTIONS + ["a photo of a cat", "a broken image"] for word in caption.split()})


def tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -1.0) for word in WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def text_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=HIDDEN, d_kv=8, d_ff=2 * HIDDEN, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0))


def transformer(sample_size: int, out_channels: int):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                    out_channels=out_channels, num_layers=1, cross_attention_dim=24,
                                    sample_size=sample_size, patch_size=2, caption_channels=HIDDEN,
                                    norm_num_groups=8)


def scheduler(prediction_type: str):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                       prediction_type=prediction_type)


def save_tiny_pixart(path: Path, kind: str = "alpha") -> Path:
    """``kind``: "alpha" (PixArtAlphaPipeline, micro-conditions, learned variance, epsilon) or
    "sigma" (PixArtSigmaPipeline, v-prediction, ``out_channels = in_channels``)."""
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    torch.manual_seed(0)
    tok = tokenizer()
    if kind == "alpha":
        pipeline, model, prediction = PixArtAlphaPipeline, transformer(128, 8), "epsilon"
    else:
        pipeline, model, prediction = PixArtSigmaPipeline, transformer(8, 4), "v_prediction"
    pipe = pipeline(tokenizer=tok, text_encoder=text_encoder(len(tok)), vae=vae(), transformer=model,
                    scheduler=scheduler(prediction))
    pipe.save_pretrained(path)
    return path
