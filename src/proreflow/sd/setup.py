"""The ``stable-diffusion`` setup: a Stable Diffusion teacher and its latent data for the engine.

``setup: {name: stable-diffusion, teacher: DIR_OR_ID, data: PATH, ...}`` in a config (or a call
of :func:`build_sd_setup`) gives a :class:`~proreflow.training.setup.DistillationSetup` with

- ``teacher_model``: the teacher's UNet (float32 master weights; the engine casts the frozen
  teacher to the run's mixed-precision dtype and copies it into the student). With
  ``lora_rank > 0`` it carries zero-initialised LoRA layers (so it still is the teacher) and is
  the student itself, trained in place, with ``teacher_view`` (adapters disabled) as the teacher:
  only the LoRA layers train (float32), and under mixed precision the engine casts its frozen
  base, the teacher's weights, to that dtype;
- ``dataset``: ``(latents, cond)`` items, from images with captions (VAE posterior sample) or
  from prompts alone (the teacher's own samples), encoded when read or once into a cache;
- ``uncond``: the null condition (the pipeline's negative for an empty prompt);
- ``keep_on_dropout``: for SDXL ``("added_cond_kwargs.time_ids",)``: a dropped condition (and
  the unconditional branch of guidance) keeps the sample's own size / crop micro-conditioning
  and loses only the text, as in diffusers' SDXL training scripts and pipeline;
- ``adapter``: :func:`~proreflow.sd.pipeline.unet_network`;
- ``info``: teacher, data, resolution, LoRA settings and ``skipped_images`` (unreadable image ->
  error), which the engine writes into the run's ``student.json``. Encoding on the fly, it is
  the dataset's own record, filled as images are read (in loader workers, each worker keeps
  its own and logs its skips); with a cache it is the cache's complete list. Encoding on the
  fly, each item also names the images skipped to reach it, so the stage summary counts them
  (``skipped_items``, ``skipped_item_names``) whatever the number of loader workers.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Literal

import torch

from ..conditioning import map_cond
from ..schedules import VP_TIME_CONVENTION
from ..training.environment import as_dtype, process_state
from ..training.setup import DistillationSetup, ValidationSet
from .captions import ImageCaptionDataset, PromptDataset, open_source, read_prompts
from .latent_cache import (
    encode_items,
    files_fingerprint,
    generate_items,
    latent_dataset,
)
from .lora import LORA_TARGETS, AdaptersDisabled, add_lora
from .pipeline import load_teacher, read_model_index, unet_network

LIMITS = {"resolution": (8, 4096), "prompt_steps": (1, 1000), "prompt_guidance": (0, 100), "lora_rank": (0, 1024),
          "lora_alpha": (0, 1e6), "cache_batch_size": (1, 4096), "num_workers": (0, 256), "seed": (0, 2**63 - 1)}
"""Bounds of the setup's numbers (beyond them memory runs out or a run never ends)."""


def check_numbers(**values) -> None:
    """Refuse (ValueError naming the key) a value of ``values`` that is not a finite number within :data:`LIMITS`."""
    for key, value in values.items():
        if value is None:
            continue
        low, high = LIMITS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"setup.{key}: expected a finite number, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"setup.{key}: must be {f'at least {low}' if value < low else f'at most {high}'}, "
                             f"got {value}")


def default_device() -> torch.device:
    """This process's accelerator (``accelerate`` picks the GPU of each process), else CPU."""
    return process_state().device


def build_sd_setup(teacher: str, data: str | list[str] | None = None, data_kind: str = "auto",
                   prompts: str | None = None, resolution: int | None = None, cache_dir: str | None = None,
                   center_crop: bool = True, random_flip: bool = False, image_column: str = "image",
                   caption_column: str | None = None, prompt_steps: int = 32, prompt_guidance: float = 7.5,
                   lora_rank: int = 0, lora_alpha: float | None = None,
                   lora_targets: Literal["attention", "unet"] = "attention", compile: bool = False,
                   encoder_dtype: str = "float32", variant: str | None = None,
                   local_files_only: bool | None = None, device: str | None = None, seed: int = 0,
                   cache_batch_size: int = 16, num_workers: int = 0,
                   validation_prompts: str | None = None) -> DistillationSetup:
    """The Stable Diffusion setup (module doc).

    teacher: diffusers pipeline folder or hub id (SD1.5, SD2.x, SDXL and fine-tunes).
    data: image-caption folder, webdataset shards or a local ``datasets`` folder (``data_kind``:
        auto, folder, webdataset, datasets). prompts: a prompt file instead, for prompt-only
        training (teacher samples with ``prompt_steps`` DDIM steps at ``prompt_guidance``).
    resolution: training image size (default: the pipeline's, e.g. 512 / 1024).
    cache_dir: encode everything once into this folder (reused while the settings, the data files and
        the encoders match; rebuilt when files or encoders changed; refused for other settings).
    lora_rank / lora_alpha: train LoRA layers instead of all weights; one UNet in memory: the teacher is the
        student with its adapters disabled (trained in place). lora_targets: the layers they adapt,
        ``attention`` (the attention projections) or ``unet`` (LCM-LoRA's: convolutions and time embeddings too;
        :data:`~proreflow.sd.lora.LORA_TARGETS`).
    compile: torch.compile in place (teacher and student); gradient checkpointing is the recipe key
        ``gradient_checkpointing``.
    encoder_dtype: text encoders' dtype (float32, bf16, fp16); the VAE stays float32.
    seed: of the VAE posterior samples / prompt noise (item i uses (seed, i)).
    validation_prompts: a prompt file (.txt or .jsonl) whose prompts the run's validation grids show
        (recipe ``validation_every``; default: the captions of the dataset's first items, encoded).
    """
    if (data is None) == (prompts is None):
        raise ValueError("stable-diffusion setup: give exactly one of data (images with captions) and "
                         "prompts (a prompt file, prompt-only training)")
    check_numbers(resolution=resolution, prompt_steps=prompt_steps, prompt_guidance=prompt_guidance,
                   lora_rank=lora_rank, lora_alpha=lora_alpha, cache_batch_size=cache_batch_size,
                   num_workers=num_workers, seed=seed)
    if lora_targets not in LORA_TARGETS:
        raise ValueError(f"setup.lora_targets: {lora_targets!r} is not one of {', '.join(LORA_TARGETS)}")
    # everything that can be checked without the teacher is checked before it loads
    read_model_index(teacher, local_files_only)
    prompt_list = read_prompts(prompts, caption_column) if prompts is not None else None
    validation_list = read_prompts(validation_prompts) if validation_prompts is not None else None
    source = open_source(data, data_kind, image_column, caption_column) if data is not None else None
    device = torch.device(device) if device is not None else default_device()
    sd = load_teacher(teacher, encoder_dtype=encoder_dtype, variant=variant, local_files_only=local_files_only,
                      device=device)
    resolution = resolution or sd.resolution
    sd.latent_shape(resolution)  # checks the size
    encoders = [getattr(sd.pipe, name, None) for name in ("text_encoder", "text_encoder_2", "vae")]
    caching = {"cache_dir": cache_dir, "cache_batch_size": cache_batch_size, "num_workers": num_workers,
               "encoder_dtype": encoder_dtype}
    if prompts is not None:
        items = PromptDataset(prompt_list, resolution)
        encode = partial(generate_items, sd, seed=seed, resolution=resolution, steps=prompt_steps,
                         guidance=prompt_guidance)
        settings = {"prompts": str(prompts), "prompt_steps": prompt_steps, "prompt_guidance": prompt_guidance,
                    "timesteps": VP_TIME_CONVENTION,  # the teacher's DDIM made the images
                    "teacher": str(teacher), "resolution": resolution, "seed": seed}
        dataset = encoded_dataset(items, encode, settings, [prompts], encoders, **caching)
    else:
        dataset = caption_latents(source, data, partial(encode_items, sd, seed=seed, resolution=resolution), encoders,
                                  teacher=teacher, resolution=resolution, center_crop=center_crop,
                                  random_flip=random_flip, seed=seed, **caching)

    unet = sd.unet
    teacher_view = student_lora(unet, lora_rank, lora_alpha, lora_targets)
    if compile:
        unet.compile()
    uncond = map_cond(lambda a: a.float().cpu(), sd.null_cond())
    info = {"model": "stable-diffusion", "teacher": str(teacher), "pipeline": type(sd.pipe).__name__,
            "resolution": resolution, "lora_rank": lora_rank, "lora_alpha": lora_alpha or lora_rank or None,
            "lora_targets": lora_targets if lora_rank else None,
            "data": str(data if data is not None else prompts), "prompt_only": prompts is not None,
            "cache_dir": str(Path(cache_dir)) if cache_dir else None,
            "skipped_images": dataset.skipped}  # the live dict: runs record what was skipped by then
    return DistillationSetup(teacher_model=unet, prediction_type=sd.prediction_type, schedule=sd.schedule,
                             dataset=dataset, uncond=uncond, adapter=unet_network, info=info,
                             keep_on_dropout=("added_cond_kwargs.time_ids",) if sd.is_sdxl else (),
                             teacher_view=teacher_view, validation=validation_set(sd, validation_list),
                             decode=latent_decoder(sd))


def encoded_dataset(items, encode, settings: dict, files: list, encoders: list, *, cache_dir: str | None,
                    cache_batch_size: int, num_workers: int, encoder_dtype: str):
    """``items`` encoded by ``encode`` when read, or once into ``cache_dir``
    (:func:`~proreflow.sd.latent_cache.latent_dataset`), the cache keyed on ``settings`` (a change is refused) and
    on what they are encoded from and with: ``files``, ``encoders``' classes and ``encoder_dtype`` (a change
    rebuilds it). Shared by every latent family (SD, SD3, PixArt)."""
    if cache_dir is not None:
        settings = {**settings, "files": files_fingerprint(files, exclude=cache_dir),
                    "encoder_dtype": str(as_dtype(encoder_dtype)),
                    "encoder": "+".join(type(m).__name__ for m in encoders if m is not None)}
    return latent_dataset(items, encode, settings, cache_dir, cache_batch_size, num_workers)


def caption_latents(source, data, encode, encoders: list, *, teacher: str, resolution: int, center_crop: bool,
                    random_flip: bool, seed: int, extra: dict | None = None, **caching):
    """The latent dataset of images with captions (:func:`~proreflow.sd.captions.open_source`'s ``source`` at
    ``resolution``) that the latent families train on (:func:`encoded_dataset`; ``caching``: its cache keywords;
    ``extra``: more settings the family's encoding depends on)."""
    items = ImageCaptionDataset(source, resolution, center_crop, random_flip)
    settings = {"data": str(data), "center_crop": center_crop, "random_flip": random_flip, "teacher": str(teacher),
                "resolution": resolution, "seed": seed, **(extra or {})}
    files = getattr(source, "shards", None) or [getattr(source, "root", None) or source.path]
    return encoded_dataset(items, encode, settings, files, encoders, **caching)


def student_lora(model, rank: int, alpha: float | None, targets: str = "attention"):
    """With ``rank``: zero-initialised LoRA layers on ``model`` (:data:`~proreflow.sd.lora.LORA_TARGETS`), the only
    weights that train, and the teacher as a view of the student (its adapters disabled: one network in memory);
    the ``teacher_view`` of the setup, None for a full student."""
    if not rank:
        return None
    add_lora(model, rank, alpha, LORA_TARGETS[targets])
    return AdaptersDisabled


def validation_set(teacher, prompts: list[str] | None) -> ValidationSet | None:
    """The validation grids' conditions: ``prompts`` encoded by ``teacher`` (its ``encode_prompts``), on CPU."""
    if not prompts:
        return None
    return ValidationSet(map_cond(lambda a: a.float().cpu(), teacher.encode_prompts(prompts)), list(prompts))


def latent_decoder(teacher):
    """Latents -> images in [-1, 1] on CPU, by ``teacher``'s VAE (``decode_latents``), a few at a time."""
    def decode(latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([teacher.decode_latents(z).cpu() for z in latents.split(4)])
    return decode
