"""PixArt teachers (PixArt-alpha, PixArt-Sigma) from a diffusers folder or hub id (offline cache).

A ``PixArtTransformer2DModel`` (a DiT) on the VP path: the same schedule, timesteps and output
types (epsilon, v_prediction) as Stable Diffusion's UNets, read from the scheduler config.
:class:`PixArtTeacher` gives what distillation needs, through the pipeline's own methods:

- prompts -> the keyword arguments of the transformer: ``{"encoder_hidden_states": (B, L, D),
  "encoder_attention_mask": (B, L)}`` from ``pipe.encode_prompt`` (T5, padded to the pipeline's
  ``max_sequence_length``: 120 for alpha, 300 for Sigma; prompts as written, ``clean_caption=False``,
  which is what the pipeline does too where beautifulsoup4 / ftfy are missing); where the transformer uses additional
  conditions (PixArt-alpha 1024, ``use_additional_conditions``), also
  ``{"added_cond_kwargs": {"resolution": (B, 2) = (h, w), "aspect_ratio": (B, 1) = h / w}}``, what the
  pipeline passes for an ``h x w`` image (square training crops: ``(r, r)`` and 1);
- the null condition of guidance: "" encoded (the pipeline's default negative prompt) with its mask;
- images in [-1, 1] <-> latents (:class:`~proreflow.sd.pipeline.VPPipelineTeacher`).

Learned variance: PixArt's released transformers output ``out_channels = 2 * in_channels`` (the
noise prediction, then the variance interpolation); :func:`transformer_network` keeps the first half,
as the pipeline does.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..conditioning import Cond, map_cond
from ..sd.pipeline import VPPipelineTeacher, load_pipeline, patched_latent_shape
from ..teachers import Network
from ..training.environment import as_dtype

log = logging.getLogger(__name__)

SUPPORTED_PIPELINES = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")


@dataclass
class PixArtTeacher(VPPipelineTeacher):
    """A loaded ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline`` and what distillation needs from it (module doc)."""

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def resolution(self) -> int:
        """The pipeline's default image size: ``transformer.sample_size * vae_scale_factor``."""
        return int(self.transformer.config.sample_size) * self.pipe.vae_scale_factor

    @property
    def max_sequence_length(self) -> int:
        """The pipeline's default prompt length in T5 tokens (its ``__call__``'s)."""
        return inspect.signature(type(self.pipe).__call__).parameters["max_sequence_length"].default

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return patched_latent_shape(self.pipe.vae_scale_factor, self.transformer.config, resolution)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int | None = None) -> dict:
        """Condition dict (module doc) of a batch of prompts, for square images of ``resolution``
        (default :attr:`resolution`; it matters only where the transformer uses size conditions)."""
        states, mask, _, _ = self.pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                                     device=self.device, clean_caption=False,
                                                     max_sequence_length=self.max_sequence_length)
        cond = {"encoder_hidden_states": states, "encoder_attention_mask": mask}
        if self.transformer.use_additional_conditions:
            r, n = float(resolution or self.resolution), len(prompts)
            cond["added_cond_kwargs"] = {"resolution": torch.tensor([[r, r]], device=self.device).expand(n, 2),
                                         "aspect_ratio": torch.ones(n, 1, device=self.device)}
        return cond

    def null_cond(self, resolution: int | None = None) -> dict:
        """The unconditional condition (batch 1): "" encoded."""
        return self.encode_prompts([""], resolution)


def transformer_network(transformer) -> Network:
    """``PixArtTransformer2DModel`` as ``network(x, timestep, cond)`` (``cond``: the condition dict, its
    floating leaves cast to the transformer's dtype); with learned variance (``out_channels = 2 *
    in_channels``) the first half of the output, the noise / v prediction, as the pipeline takes it."""
    channels = int(transformer.config.in_channels)
    learned_variance = int(transformer.config.out_channels) == 2 * channels

    def network(x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        dtype = transformer.dtype  # once per call: ModelMixin.dtype walks the module tree
        kwargs = map_cond(lambda a: a.to(dtype) if a.is_floating_point() else a, cond)
        out = transformer(x, timestep=timestep, **kwargs, return_dict=False)[0]
        return out[:, :channels] if learned_variance else out

    return network


def load_pixart_teacher(source: str | Path, transformer_dtype: str | torch.dtype = torch.float32,
                        encoder_dtype: str | torch.dtype = torch.float32, variant: str | None = None,
                        local_files_only: bool | None = None, device=None) -> PixArtTeacher:
    """Load a ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline`` (folder or hub id) as a :class:`PixArtTeacher`.

    transformer_dtype: the transformer's weights (float32: the student is a copy and trains in mixed
    precision). encoder_dtype: T5's (the VAE stays float32). variant: e.g. "fp16" weight files.
    local_files_only: never touch the network (default: ``HF_HUB_OFFLINE``).
    """
    dtypes = {"default": as_dtype(encoder_dtype), "transformer": as_dtype(transformer_dtype), "vae": torch.float32}
    pipe = load_pipeline(source, SUPPORTED_PIPELINES, dtypes, "PixArt-alpha, PixArt-Sigma; the stable-diffusion "
                         "setup takes SD1.5 / SDXL", variant, local_files_only)
    teacher = PixArtTeacher(pipe, str(source))
    if device is not None:
        teacher.to(device)
    sized = "on" if teacher.transformer.use_additional_conditions else "off"
    log.info("teacher %s: %s, %s prediction, %d px, size conditions %s", source, type(pipe).__name__,
             teacher.prediction_type, teacher.resolution, sized)
    return teacher
