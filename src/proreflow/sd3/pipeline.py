"""Stable Diffusion 3 teachers from a ``StableDiffusion3Pipeline`` folder (or hub id, offline cache).

:class:`SD3Teacher` gives what distillation needs, through the pipeline's own methods:

- prompts -> the keyword arguments of ``SD3Transformer2DModel``: ``{"encoder_hidden_states":
  (B, L, D), "pooled_projections": (B, P)}`` from ``pipe.encode_prompt`` (CLIP-L + CLIP-G, and
  T5 when loaded; without T5 the pipeline pads its part with zeros, as diffusers documents);
- the null condition of guidance: "" encoded (the pipeline's default negative prompt);
- images in [-1, 1] <-> latents ``(z - shift_factor) * scaling_factor`` (VAE in float32);
- the teacher's :class:`~proreflow.flow.FlowSchedule` from its scheduler config (static shift,
  or dynamic shifting with the pipeline's own ``calculate_shift`` of the latent size).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..conditioning import Cond, map_cond
from ..flow import FlowSchedule
from ..sd.pipeline import open_pipeline, patched_latent_shape, read_model_index
from ..teachers import Network
from ..training.environment import as_dtype

log = logging.getLogger(__name__)

PIPELINE = "StableDiffusion3Pipeline"
PIPELINES = (PIPELINE,)
T5_COMPONENTS = ("text_encoder_3", "tokenizer_3")
@dataclass
class SD3Teacher:
    """A loaded ``StableDiffusion3Pipeline`` and what distillation needs from it (module doc)."""

    pipe: object
    source: str
    window_space: str = "sigma"

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def resolution(self) -> int:
        """The pipeline's default image size: ``transformer.sample_size * vae_scale_factor``."""
        return int(self.transformer.config.sample_size) * self.pipe.vae_scale_factor

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return patched_latent_shape(self.pipe.vae_scale_factor, self.transformer.config, resolution)

    def mu(self, resolution: int) -> float | None:
        """Dynamic shifting's ``mu`` at ``resolution``: the pipeline's ``calculate_shift`` of the
        image sequence length (None for a static shift, SD3 / SD3.5)."""
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return None
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        side = self.latent_shape(resolution)[1] // int(self.transformer.config.patch_size)
        return calculate_shift(side * side, config.get("base_image_seq_len", 256),
                               config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                               config.get("max_shift", 1.16))

    def schedule(self, resolution: int | None = None) -> FlowSchedule:
        """The teacher's flow schedule (``window_space`` as loaded)."""
        return FlowSchedule.from_scheduler_config(self.pipe.scheduler.config, self.mu(resolution or self.resolution),
                                                  self.window_space)

    def to(self, device) -> SD3Teacher:
        self.pipe.to(device)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict:
        """Condition dict (module doc) of a batch of prompts."""
        states, _, pooled, _ = self.pipe.encode_prompt(list(prompts), None, None, device=self.device,
                                                       num_images_per_prompt=1, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    def null_cond(self) -> dict:
        """The unconditional condition (batch 1): "" encoded."""
        return self.encode_prompts([""])

    @torch.no_grad()
    def encode_images(self, pixels: Tensor, generator: torch.Generator | list | None = None) -> Tensor:
        """Latents of images in [-1, 1]: a VAE posterior sample, ``(z - shift_factor) * scaling_factor``."""
        vae = self.vae
        z = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.sample(generator=generator)
        return ((z - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] from latents (the inverse scaling of :meth:`encode_images`)."""
        vae = self.vae
        z = latents.to(self.device, vae.dtype) / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
        return vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)


def transformer_network(transformer) -> Network:
    """``SD3Transformer2DModel`` as ``network(x, timestep, cond)``; ``cond``: the condition dict, its
    floating leaves cast to the transformer's dtype. The timestep is ``sigma * 1000`` (the Denoiser's)."""

    def cast(a: Tensor) -> Tensor:
        return a.to(transformer.dtype) if a.is_floating_point() else a

    def network(x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        kwargs = map_cond(cast, cond)
        return transformer(hidden_states=x, timestep=timestep, **kwargs, return_dict=False)[0]

    return network


def load_sd3_teacher(source: str | Path, transformer_dtype: str | torch.dtype = torch.float32,
                     encoder_dtype: str | torch.dtype = torch.float32, use_t5: bool = True,
                     window_space: str = "sigma", variant: str | None = None,
                     local_files_only: bool | None = None, device=None) -> SD3Teacher:
    """Load a ``StableDiffusion3Pipeline`` (folder or hub id) as an :class:`SD3Teacher`.

    use_t5: load the T5 encoder (False: ``text_encoder_3=None``, diffusers pads with zeros; also
        when the folder has no T5). window_space: where windows fall (:mod:`proreflow.flow`).
    """
    index = read_model_index(source, local_files_only)
    if index.get("_class_name") != PIPELINE:
        raise ValueError(f"teacher {source}: a {index.get('_class_name')} is not a {PIPELINE}; the "
                         "stable-diffusion-3 setup takes SD3 / SD3.5 pipelines (stable-diffusion for SD1.5 / SDXL)")
    without_t5 = not use_t5 or index.get("text_encoder_3", [None])[0] is None
    dtypes = {"default": as_dtype(encoder_dtype), "transformer": as_dtype(transformer_dtype), "vae": torch.float32}
    pipe = open_pipeline(source, dtypes, T5_COMPONENTS if without_t5 else (), variant, local_files_only,
                         "teacher pipeline", index)
    teacher = SD3Teacher(pipe, str(source), window_space)
    if device is not None:
        teacher.to(device)
    log.info("teacher %s: %s, flow matching (shift %s), %d px, T5 %s", source, PIPELINE,
             pipe.scheduler.config.get("shift"), teacher.resolution, "on" if pipe.text_encoder_3 is not None else "off")
    return teacher
