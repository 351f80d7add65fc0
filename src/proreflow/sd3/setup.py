"""The ``stable-diffusion-3`` setup: an SD3 / SD3.5 teacher and its latent data for the engine.

``setup: {name: stable-diffusion-3, teacher: DIR_OR_ID, data: PATH, ...}`` gives a
:class:`~proreflow.training.setup.DistillationSetup` with

- ``teacher_model``: the ``SD3Transformer2DModel`` (float32 master weights; with ``lora_rank > 0``
  zero-initialised LoRA layers on the attention projections, and only those train: the teacher is the same
  network with its adapters disabled);
- ``prediction_type="flow_velocity"`` and the teacher's :class:`~proreflow.flow.FlowSchedule`
  (``window_space``: windows uniform in sigma, the default, or in diffusers' unshifted s);
- ``dataset``: ``(latents, cond)`` items from images with captions (a VAE posterior sample of
  each, seeded by ``(seed, index)``), encoded when read or once into a cache (the Stable
  Diffusion family's image-caption readers and latent cache, which are model-neutral);
- ``uncond``: "" encoded; ``adapter``: :func:`~proreflow.sd3.pipeline.transformer_network`.
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
from ..sd.setup import caption_latents, check_numbers, default_device, latent_decoder, student_lora, validation_set
from ..training.setup import DistillationSetup
from .pipeline import SD3Teacher, load_sd3_teacher, transformer_network


@torch.no_grad()
def encode_sd3_items(teacher: SD3Teacher, items: list[dict], seed: int) -> tuple[Tensor, dict]:
    """Latents and condition dict (with batch dimension) of items of an ``ImageCaptionDataset``."""
    pixels = torch.stack([item["pixels"] for item in items])
    latents = teacher.encode_images(pixels, [item_generator(seed, item["index"]) for item in items])
    return latents, teacher.encode_prompts([item["caption"] for item in items])


def build_sd3_setup(teacher: str, data: str | list[str], data_kind: str = "auto", resolution: int | None = None,
                    cache_dir: str | None = None, center_crop: bool = True, random_flip: bool = False,
                    image_column: str = "image", caption_column: str | None = None, window_space: str = "sigma",
                    use_t5: bool = True, lora_rank: int = 0, lora_alpha: float | None = None,
                    encoder_dtype: str = "float32", variant: str | None = None,
                    local_files_only: bool | None = None, device: str | None = None, seed: int = 0,
                    cache_batch_size: int = 16, num_workers: int = 0,
                    validation_prompts: str | None = None) -> DistillationSetup:
    """The SD3 setup (module doc); the arguments are the ``stable-diffusion`` setup's, plus
    ``window_space`` (:mod:`proreflow.flow`) and ``use_t5`` (False: no T5, diffusers pads with zeros)."""
    check_numbers(resolution=resolution, lora_rank=lora_rank, lora_alpha=lora_alpha,
                   cache_batch_size=cache_batch_size, num_workers=num_workers, seed=seed)
    read_model_index(teacher, local_files_only)  # a wrong teacher fails before the data are opened
    validation_list = read_prompts(validation_prompts) if validation_prompts is not None else None
    source = open_source(data, data_kind, image_column, caption_column)
    device = torch.device(device) if device is not None else default_device()
    sd3 = load_sd3_teacher(teacher, encoder_dtype=encoder_dtype, use_t5=use_t5, window_space=window_space,
                           variant=variant, local_files_only=local_files_only, device=device)
    resolution = resolution or sd3.resolution
    sd3.latent_shape(resolution)  # checks the size
    use_t5 = sd3.pipe.text_encoder_3 is not None
    encoders = [getattr(sd3.pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")]
    dataset = caption_latents(source, data, partial(encode_sd3_items, sd3, seed=seed), encoders, teacher=teacher,
                              resolution=resolution, center_crop=center_crop, random_flip=random_flip, seed=seed,
                              extra={"use_t5": use_t5}, cache_dir=cache_dir, cache_batch_size=cache_batch_size,
                              num_workers=num_workers, encoder_dtype=encoder_dtype)

    model = sd3.transformer
    teacher_view = student_lora(model, lora_rank, lora_alpha)
    schedule = sd3.schedule(resolution)
    info = {"model": "stable-diffusion-3", "teacher": str(teacher), "pipeline": type(sd3.pipe).__name__,
            "resolution": resolution, "window_space": window_space, "shift": schedule.shift,
            "use_t5": use_t5, "lora_rank": lora_rank, "lora_alpha": lora_alpha or lora_rank or None,
            "data": str(data), "cache_dir": str(Path(cache_dir)) if cache_dir else None,
            "skipped_images": dataset.skipped}
    return DistillationSetup(teacher_model=model, prediction_type="flow_velocity", schedule=schedule,
                             dataset=dataset, uncond=map_cond(lambda a: a.float().cpu(), sd3.null_cond()),
                             adapter=transformer_network, info=info, teacher_view=teacher_view,
                             validation=validation_set(sd3, validation_list), decode=latent_decoder(sd3))
