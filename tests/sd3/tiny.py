"""A tiny random Stable Diffusion 3 pipeline built offline and saved like a real one.

Two CLIP text encoders with projections (32-dim states, pooled 2 x 32 = 64), no T5 (diffusers pads
its part with zeros), an ``SD3Transformer2DModel`` with one joint block (patch 2, joint dim 64),
an SD3-style VAE (``shift_factor`` / ``scaling_factor``, no quant convs; factor 2: 16 px <-> 4 x 8 x 8)
and the flow-matching Euler scheduler with SD3's ``shift = 3``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from sd.tiny import HIDDEN, text_encoder, tokenizer


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=16, shift_factor=0.0609,
                         scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False)


def transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=2 * HIDDEN,
                                 caption_projection_dim=16, pooled_projection_dim=2 * HIDDEN, pos_embed_max_size=16)


def save_tiny_sd3(path: Path, shift: float = 3.0, **scheduler_kwargs) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tok = tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=shift, **scheduler_kwargs),
        vae=vae(), text_encoder=text_encoder(len(tok), with_projection=True), tokenizer=tok,
        text_encoder_2=text_encoder(len(tok), with_projection=True), tokenizer_2=tokenizer(),
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(path)
    return path
