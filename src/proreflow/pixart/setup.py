"""The ``pixart`` setup: a PixArt-alpha / PixArt-Sigma teacher and its latent data for the engine.

``setup: {name: pixart, teacher: DIR_OR_ID, data: PATH, ...}`` gives a
:class:`~proreflow.training.setup.DistillationSetup` on the VP path, like the Stable Diffusion
setup's but with a transformer for a denoiser:

- ``teacher_model``: the ``PixArtTransformer2DModel`` (float32 master weights). With
  ``lora_rank > 0`` it carries zero-initialised LoRA layers on the attention projections
  (``to_q, to_k, to_v, to_out.0`` of the self- and cross-attention of every block, peft), only
  those train, and one transformer is in memory: the teacher is the student with its adapters
  disabled (:class:`~proreflow.sd.lora.AdaptersDisabled`);
- ``prediction_type`` and ``schedule`` from the teacher's scheduler config (epsilon for the
  released PixArt models, v_prediction where a config says so);
- ``dataset``: ``(latents, cond)`` items from images with captions (a VAE posterior sample of each,
  seeded by ``(seed, index)``), encoded when read or once into a cache (the Stable Diffusion
  family's image-caption readers and latent cache, which are model-neutral), keyed on the files
  and encoders as the Stable Diffusion setup's;
- ``uncond``: "" encoded; ``keep_on_dropout``: the size conditions of PixArt-alpha 1024
  (``added_cond_kwargs.resolution`` / ``aspect_ratio``) stay the sample's own when its text is
  dropped, as in the pipeline's unconditional branch; ``adapter``:
  :func:`~proreflow.pixart.pipeline.transformer_network`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from ..conditioning import map_cond
from ..sd.captions import open_source, read_prompts
from ..sd.latent_cache import item_generator
from ..sd.pipeline import read_model_index
from ..sd.setup import caption_latents, check_numbers, default_device, latent_decoder, student_lora
from ..training.setup import DistillationSetup, ValidationSet
from .pipeline import PixArtTeacher, load_pixart_teacher, transformer_network

SIZE_CONDITIONS = ("added_cond_kwargs.resolution", "added_cond_kwargs.aspect_ratio")


@torch.no_grad()
def encode_pixart_items(teacher: PixArtTeacher, items: list[dict], seed: int, resolution: int) -> tuple[Tensor, dict]:
    """Latents and condition dict (with batch dimension) of items of an ``ImageCaptionDataset``."""
    pixels = torch.stack([item["pixels"] for item in items])
    latents = teacher.encode_images(pixels, [item_generator(seed, item["index"]) for item in items])
    return latents, teacher.encode_prompts([item["caption"] for item in items], resolution)


def build_pixart_setup(teacher: str, data: str | list[str], data_kind: str = "auto", resolution: int | None = None,
                       cache_dir: str | None = None, center_crop: bool = True, random_flip: bool = False,
                       image_column: str = "image", caption_column: str | None = None, lora_rank: int = 0,
                       lora_alpha: float | None = None, encoder_dtype: str = "float32", variant: str | None = None,
                       local_files_only: bool | None = None, device: str | None = None, seed: int = 0,
                       cache_batch_size: int = 16, num_workers: int = 0,
                       validation_prompts: str | None = None) -> DistillationSetup:
    """The PixArt setup (module doc); the arguments are the ``stable-diffusion`` setup's for images with
    captions (:func:`~proreflow.sd.setup.build_sd_setup`)."""
    check_numbers(resolution=resolution, lora_rank=lora_rank, lora_alpha=lora_alpha,
                   cache_batch_size=cache_batch_size, num_workers=num_workers, seed=seed)
    read_model_index(teacher, local_files_only)  # a wrong teacher fails before the data are opened
    validation_list = read_prompts(validation_prompts) if validation_prompts is not None else None
    source = open_source(data, data_kind, image_column, caption_column)
    device = torch.device(device) if device is not None else default_device()
    pixart = load_pixart_teacher(teacher, encoder_dtype=encoder_dtype, variant=variant,
                                 local_files_only=local_files_only, device=device)
    resolution = resolution or pixart.resolution
    pixart.latent_shape(resolution)  # checks the size
    encoders = [pixart.pipe.text_encoder, pixart.vae]
    dataset = caption_latents(source, data, partial(encode_pixart_items, pixart, seed=seed, resolution=resolution),
                              encoders, teacher=teacher, resolution=resolution, center_crop=center_crop,
                              random_flip=random_flip, seed=seed, cache_dir=cache_dir,
                              cache_batch_size=cache_batch_size, num_workers=num_workers, encoder_dtype=encoder_dtype)

    model = pixart.transformer
    teacher_view = student_lora(model, lora_rank, lora_alpha)
    sized = bool(model.use_additional_conditions)
    info = {"model": "pixart", "teacher": str(teacher), "pipeline": type(pixart.pipe).__name__,
            "resolution": resolution, "size_conditions": sized, "lora_rank": lora_rank,
            "lora_alpha": lora_alpha or lora_rank or None, "data": str(data),
            "cache_dir": str(Path(cache_dir)) if cache_dir else None, "skipped_images": dataset.skipped}
    on_cpu = partial(map_cond, lambda a: a.float().cpu())
    uncond = on_cpu(pixart.null_cond(resolution))
    validation = (ValidationSet(on_cpu(pixart.encode_prompts(validation_list, resolution)), list(validation_list))
                  if validation_list else None)  # at the training size (the size conditions)
    return DistillationSetup(teacher_model=model, prediction_type=pixart.prediction_type, schedule=pixart.schedule,
                             dataset=dataset, uncond=uncond, adapter=transformer_network, info=info,
                             keep_on_dropout=SIZE_CONDITIONS if sized else (),
                             teacher_view=teacher_view, validation=validation, decode=latent_decoder(pixart))
