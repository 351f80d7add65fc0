"""Stable Diffusion teachers (SD1.5, SD2.x, SDXL) from a diffusers folder or model id.

:func:`load_teacher` reads a diffusers pipeline folder (or a hub id, offline from the local
cache) through ``DiffusionPipeline.from_pretrained``: the same code for real weights,
community fine-tunes in diffusers format and the tiny test components. :class:`SDTeacher`
then gives what distillation needs, through the pipeline's own methods where it has them:

- prompts -> condition dicts, the keyword arguments of ``UNet2DConditionModel``:
  SD1.5/SD2 ``{"encoder_hidden_states": (B, 77, D)}``; SDXL adds
  ``{"added_cond_kwargs": {"text_embeds": pooled (B, P), "time_ids": (B, 6)}}`` with the
  micro-conditioning ``time_ids = (orig_h, orig_w, crop_y, crop_x, target_h, target_w)``;
- the null condition of classifier-free guidance: the encoding of "" (PeRFlow), or zeros
  where an SDXL pipeline sets ``force_zeros_for_empty_prompt`` (as the pipeline does);
- images in [-1, 1] <-> latents ``(z - shift_factor) * scaling_factor`` (the VAE always runs
  in float32: SDXL's VAE overflows in float16).

The teacher's schedule and output type come from its scheduler config (epsilon for SD1.5 /
SDXL, v_prediction for SD2.x 768).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..conditioning import Cond, map_cond
from ..schedules import VPSchedule
from ..teachers import Network, diffusers_network
from ..training.checkpoint import first_nonfinite
from ..training.environment import as_dtype

log = logging.getLogger(__name__)

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def default_local_files_only() -> bool:
    """True when the Hugging Face hub is switched off (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _looks_like_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and "\\" not in source


def read_model_index(source: str | Path, local_files_only: bool | None = None) -> dict:
    """The ``model_index.json`` of a pipeline folder or hub id, with errors that say what to do."""
    from diffusers import DiffusionPipeline

    source = str(source)
    local_files_only = default_local_files_only() if local_files_only is None else local_files_only
    path = Path(source).expanduser()
    if path.exists() or not _looks_like_hub_id(source):
        if not path.is_dir():
            raise FileNotFoundError(
                f"teacher folder {path} does not exist. --teacher takes a diffusers pipeline folder (with "
                "model_index.json) or a Hugging Face model id such as stable-diffusion-v1-5/stable-diffusion-v1-5")
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a diffusers pipeline folder (no model_index.json). Convert a single-file "
                "checkpoint once with StableDiffusionPipeline.from_single_file(FILE).save_pretrained(DIR)")
        return _index(DiffusionPipeline.load_config(str(path)), path / "model_index.json")
    try:
        return _index(DiffusionPipeline.load_config(source, local_files_only=local_files_only), source)
    except OSError as err:
        hint = (" It is not in the local Hugging Face cache: download it once online (`hf download "
                f"{source}`) or pass a local folder." if local_files_only else "")
        raise OSError(f"could not load teacher {source!r} (local_files_only={local_files_only}).{hint} "
                      f"Cause: {err}") from err


@dataclass
class VPPipelineTeacher:
    """A loaded diffusers pipeline with a VAE and a VP scheduler: its schedule, output type and latents.

    The part of a teacher that does not depend on its denoiser or text encoders: Stable Diffusion
    (:class:`SDTeacher`) and PixArt (:class:`proreflow.pixart.pipeline.PixArtTeacher`) extend it.
    """

    pipe: object
    source: str

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler_config(self) -> dict:
        return dict(self.pipe.scheduler.config)

    @property
    def prediction_type(self) -> str:
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    @property
    def schedule(self) -> VPSchedule:
        return VPSchedule.from_scheduler_config(self.pipe.scheduler.config)

    @property
    def device(self) -> torch.device:
        return self.vae.device

    def to(self, device):
        self.pipe.to(device)
        return self

    @torch.no_grad()
    def encode_images(self, pixels: Tensor, generator: torch.Generator | list | None = None) -> Tensor:
        """Latents of images in [-1, 1]: a sample of the VAE posterior, shifted and scaled."""
        vae = self.vae
        dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        z = dist.sample(generator=generator)
        shift = vae.config.get("shift_factor") or 0.0
        return ((z - shift) * vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] from latents (the inverse scaling of :meth:`encode_images`)."""
        vae = self.vae
        shift = vae.config.get("shift_factor") or 0.0
        z = latents.to(self.device, vae.dtype) / vae.config.scaling_factor + shift
        return vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)


@dataclass
class SDTeacher(VPPipelineTeacher):
    """A loaded Stable Diffusion pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``) and
    what distillation needs from it (module doc)."""

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def is_sdxl(self) -> bool:
        return type(self.pipe).__name__ == "StableDiffusionXLPipeline"

    @property
    def resolution(self) -> int:
        """The pipeline's default image size: ``unet.sample_size * vae_scale_factor``."""
        return int(self.unet.config.sample_size) * self.pipe.vae_scale_factor

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        factor = self.pipe.vae_scale_factor
        if resolution % factor:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE's factor {factor}")
        return (int(self.unet.config.in_channels), resolution // factor, resolution // factor)

    # ------------------------------------------------------------ text

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], time_ids: Tensor | None = None) -> dict:
        """Condition dict (module doc) of a batch of prompts; SDXL ``time_ids`` default to
        :meth:`default_time_ids`."""
        pipe = self.pipe
        if not self.is_sdxl:
            states, _ = pipe.encode_prompt(list(prompts), self.device, 1, False)
            return {"encoder_hidden_states": states}
        states, _, pooled, _ = pipe.encode_prompt(list(prompts), device=self.device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        if time_ids is None:
            time_ids = self.default_time_ids().expand(len(prompts), -1)
        return {"encoder_hidden_states": states,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(self.device)}}

    def null_cond(self) -> dict:
        """The unconditional condition (batch 1): "" encoded, or zeros (SDXL ``force_zeros_for_empty_prompt``)."""
        cond = self.encode_prompts([""])
        if self.is_sdxl and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            cond["encoder_hidden_states"] = torch.zeros_like(cond["encoder_hidden_states"])
            cond["added_cond_kwargs"]["text_embeds"] = torch.zeros_like(cond["added_cond_kwargs"]["text_embeds"])
        return cond

    def default_time_ids(self, resolution: int | None = None) -> Tensor:
        """SDXL micro-conditioning of an uncropped square image: ``(r, r, 0, 0, r, r)``, shape (1, 6)."""
        r = resolution or self.resolution
        return sdxl_time_ids((r, r), (0, 0), (r, r))[None]


def sdxl_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
                  target_size: tuple[int, int]) -> Tensor:
    """SDXL's ``add_time_ids``: ``original_size + crops_coords_top_left + target_size`` (h, w order)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def load_teacher(source: str | Path, unet_dtype: str | torch.dtype = torch.float32,
                 encoder_dtype: str | torch.dtype = torch.float32, variant: str | None = None,
                 local_files_only: bool | None = None, device=None) -> SDTeacher:
    """Load an SD1.5 / SD2.x / SDXL pipeline (folder or hub id) as an :class:`SDTeacher`.

    unet_dtype: the UNet's weights (float32: the student is a copy and trains in mixed precision).
    encoder_dtype: the text encoders' (the VAE stays float32). variant: e.g. "fp16" weight files.
    local_files_only: never touch the network (default: ``HF_HUB_OFFLINE``).
    """
    dtypes = {"default": as_dtype(encoder_dtype), "unet": as_dtype(unet_dtype), "vae": torch.float32}
    pipe = load_pipeline(source, SUPPORTED_PIPELINES, dtypes, "SD1.5, SD2.x, SDXL base and their fine-tunes in "
                         "diffusers format", variant, local_files_only)
    teacher = SDTeacher(pipe, str(source))
    if device is not None:
        teacher.to(device)
    log.info("teacher %s: %s, %s prediction, %d px", source, type(pipe).__name__, teacher.prediction_type,
             teacher.resolution)
    return teacher


def patched_latent_shape(vae_scale_factor: int, config, resolution: int) -> tuple[int, int, int]:
    """``(channels, side, side)`` of a transformer's square latents at ``resolution`` pixels; a ValueError
    unless ``resolution`` is a multiple of the VAE factor times the transformer's ``patch_size``."""
    factor = vae_scale_factor * int(config.patch_size)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE factor x patch size {factor}")
    side = resolution // vae_scale_factor
    return (int(config.in_channels), side, side)


def _index(config, where) -> dict:
    if not isinstance(config, dict) or not isinstance(config.get("_class_name", ""), str):
        raise ValueError(f"{where} is not a diffusers model index (a JSON object naming the pipeline class and "
                         "its components); the folder is damaged: export or download it again")
    return dict(config)


def open_pipeline(source: str | Path, dtype=None, skip: tuple[str, ...] = (), variant: str | None = None,
                  local_files_only: bool | None = None, what: str = "pipeline", index: dict | None = None):
    """``DiffusionPipeline.from_pretrained(source)``: the one loader of every pipeline proreflow opens
    (teachers, exported students, their bases). ``dtype``: one or per component; the components named in
    ``skip`` or :data:`UNUSED_COMPONENTS` that the folder has are not loaded (``None``). Its progress bars are
    off. A folder diffusers cannot load (damaged or wrong files: diffusers raises many kinds of errors) is one
    ValueError naming ``what`` and ``source``; ``index``: its model index when already read."""
    from diffusers import DiffusionPipeline

    local_files_only = default_local_files_only() if local_files_only is None else local_files_only
    index = read_model_index(source, local_files_only) if index is None else index
    skipped = {name: None for name in (*UNUSED_COMPONENTS, *skip) if name in index}
    folder = Path(source).expanduser()
    missing = [name for name, spec in index.items() if not name.startswith("_") and name not in skipped
               and isinstance(spec, list) and spec and spec[0] is not None and not (folder / name).is_dir()]
    if folder.is_dir() and missing:  # diffusers would load stand-ins (a tokenizer of the wrong length)
        raise ValueError(f"the {what} {source} lacks the folder(s) {', '.join(missing)} its model_index.json "
                         "names: export or download it again")
    try:
        pipe = DiffusionPipeline.from_pretrained(str(source), dtype=dtype, variant=variant,
                                                 local_files_only=local_files_only, **skipped)
    except OSError as err:  # keeps its error number (a full or failing disk is the environment's)
        raise type(err)(err.errno, f"loading the {what} {source} failed: {err}") from err
    except Exception as err:  # the folder's content: diffusers' and safetensors' errors are of every kind
        raise ValueError(f"loading the {what} {source} failed ({type(err).__name__}: {err}); it must be a "
                         "diffusers pipeline folder as save_pretrained writes it: export or download it again") \
            from err
    pipe.set_progress_bar_config(disable=True)
    check_finite_components(pipe, f"the {what} {source}")
    return pipe


def check_finite_components(pipe, what: str) -> None:
    """A ValueError naming the first weight of ``pipe``'s networks that holds NaN or infinite values (a damaged
    model samples black or noise images without a word otherwise)."""
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            bad = first_nonfinite(component.state_dict())
            if bad:
                raise ValueError(f"{what}: {name}: {bad}: the weights are damaged; export or download them again")


def apply_lora(pipe, lora: str | Path) -> None:
    """``pipe.load_lora_weights(lora)``; LoRA weights the pipeline cannot take (damaged, or of another
    architecture) are one ValueError naming the folder."""
    try:
        pipe.load_lora_weights(str(lora))
    except Exception as err:  # peft's and safetensors' errors are of every kind
        raise ValueError(f"loading the LoRA weights {lora} failed ({type(err).__name__}: {err}); give a folder "
                         "written by `proreflow export --lora` for this base pipeline") from err
    check_finite_components(pipe, f"the pipeline with the LoRA weights {lora}")


def load_pipeline(source: str | Path, supported: tuple[str, ...], dtypes: dict, what: str,
                  variant: str | None = None, local_files_only: bool | None = None):
    """The teacher pipeline at ``source`` (folder or hub id, :func:`open_pipeline`), refused unless its class is
    one of ``supported`` (``what``: the models they are, for the message); ``dtypes``: per component."""
    index = read_model_index(source, local_files_only)
    kind = index.get("_class_name")
    if kind not in supported:
        raise ValueError(f"teacher {source}: a {kind} is not supported; use a {' or '.join(supported)} ({what})")
    return open_pipeline(source, dtypes, variant=variant, local_files_only=local_files_only,
                         what="teacher pipeline", index=index)


def unet_network(unet) -> Network:
    """``diffusers_network`` with the condition's floating leaves cast to the UNet's dtype.

    Cached conditions are stored at reduced precision and data loaders produce float32, while a
    teacher may run in bf16: the cast keeps the UNet call valid with or without autocast.
    """
    network = diffusers_network(unet)

    def call(x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        dtype = unet.dtype  # once per call: diffusers' ModelMixin.dtype walks the module tree
        return network(x, timestep, map_cond(lambda a: a.to(dtype) if a.is_floating_point() else a, cond))

    return call
