"""Validation samples of a run: the student on fixed conditions and fixed noise, as a grid image.

Every ``validation_every`` optimiser steps of a stage and at its end (recipe keys), the main
process samples the student's EMA weights (what the stage's result will hold) with one Euler step
per window (:func:`proreflow.sample`), at the guidance the stage's student is sampled with, for
``validation_samples`` conditions: the setup's :class:`~proreflow.training.setup.ValidationSet`
(e.g. Stable Diffusion's ``validation_prompts``), else the conditions of the dataset's first items.
The noise is drawn once from the recipe seed (:func:`validation_noise`), not from the training
RNG, so the grids of a resumed run are those of an uninterrupted one and sampling changes nothing
of the training. Files::

    OUT/validation/stage-<i>-<w>w/step-<global step>.safetensors   the samples ("samples")
    OUT/validation/stage-<i>-<w>w/step-<global step>.png           their grid, labelled

The grid shows images (``setup.decode`` first, e.g. a VAE, else samples of shape ``C x H x W``
with 1 or 3 channels, in [-1, 1]) or, for 2D points, a scatter plot; other data get the
samples file only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..conditioning import Cond, map_cond, null_like
from ..files import atomic_write
from ..sampling import sample
from ..windows import TimeWindows
from .batches import collate_items, mix_seed
from .ema import EMA
from .recipes import Recipe
from .setup import DistillationSetup

VALIDATION_STREAM = 0x7A11D
"""Seed part of the validation noise: ``mix_seed(recipe seed, VALIDATION_STREAM)``."""

CELL = 96
"""Smallest side of a grid cell in pixels (small images are enlarged, nearest neighbour)."""


@dataclass
class Validation:
    """The fixed inputs of a run's validation grids (module doc)."""

    cond: Cond
    labels: list[str]
    noise: Tensor

    @classmethod
    def for_run(cls, recipe: Recipe, setup: DistillationSetup) -> Validation:
        """The setup's validation conditions (or the dataset's first items'), and the noise."""
        count = recipe.validation_samples
        if setup.validation is not None:
            cond, labels = setup.validation.cond, list(setup.validation.labels)
            count = len(labels)
        else:
            items = [setup.dataset[i % len(setup.dataset)] for i in range(count)]
            _, cond, _ = collate_items(items)
            labels = [f"item {i % len(setup.dataset)}" + _class_label(cond, i) for i in range(count)]
        x0 = torch.as_tensor(setup.dataset[0][0])
        dtype = x0.dtype if x0.is_floating_point() else torch.float32
        return cls(cond, labels, validation_noise(recipe.seed, (count, *x0.shape), dtype))


def _class_label(cond: Cond, i: int) -> str:
    if isinstance(cond, Tensor) and cond.dim() == 1 and not cond.is_floating_point():
        return f" (class {int(cond[i])})"
    return ""


def validation_noise(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """The validation noise ``N(0, I)`` of ``shape``, from a generator seeded by ``(seed, VALIDATION_STREAM)``."""
    generator = torch.Generator().manual_seed(mix_seed(seed, VALIDATION_STREAM))
    return torch.randn(shape, generator=generator, dtype=dtype)


@contextlib.contextmanager
def ema_weights(module: nn.Module, ema: EMA):
    """``module`` holding the EMA weights inside the block; its own weights restored exactly after."""
    params = dict(module.named_parameters())
    saved = {name: params[name].detach().clone() for name in ema.shadow}
    ema.copy_to(module)
    try:
        yield module
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


@torch.no_grad()
def validation_samples(setup: DistillationSetup, module: nn.Module, validation: Validation, windows: int,
                       guidance: float, uncond: Cond, device, autocast: Callable[[], Any] = contextlib.nullcontext,
                       prediction_type: str | None = None) -> Tensor:
    """``module`` (output ``prediction_type``, default the teacher's) sampled from the validation noise with
    one Euler step per window (eval mode inside)."""
    cond = map_cond(lambda c: c.to(device), validation.cond)
    null = null_like(cond, uncond, setup.keep_on_dropout) if cond is not None and uncond is not None else None
    was_training = module.training
    module.eval()
    try:
        with autocast():
            student = setup.denoiser(module, prediction_type=prediction_type)
            x = sample(student, validation.noise.to(device), TimeWindows(windows), windows, cond,
                       null, guidance)
    finally:
        module.train(was_training)
    return x.float().cpu()


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] (``N x C x H x W``, C = 1 or 3) as ``N x 3 x H x W`` uint8: ``round((x + 1) 127.5)``."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def grid_image(samples: Tensor, labels: list[str], decode: Callable[[Tensor], Tensor] | None = None
               ) -> np.ndarray | None:
    """The grid of ``samples`` as an ``H x W x 3`` uint8 array (module doc), or None for data it cannot show."""
    from PIL import Image, ImageDraw

    if decode is not None:
        samples = decode(samples)
    if samples.dim() == 2 and samples.shape[1] == 2:
        return _scatter(samples)
    if samples.dim() != 4 or samples.shape[1] not in (1, 3):
        return None
    images = to_uint8(samples)
    n, (h, w) = len(images), images.shape[-2:]
    scale = max(1, math.ceil(CELL / max(h, w)))
    cell_h, cell_w, text = h * scale, w * scale, 12
    columns = min(n, 8)
    rows = math.ceil(n / columns)
    grid = Image.new("RGB", (columns * (cell_w + 4) + 4, rows * (cell_h + text + 8) + 4), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = 4 + (i % columns) * (cell_w + 4), 4 + (i // columns) * (cell_h + text + 8)
        cell = Image.fromarray(image.permute(1, 2, 0).numpy())
        grid.paste(cell.resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
        draw.text((x, y + cell_h + 2), labels[i][: max(4, cell_w // 6)], fill="black")
    return np.asarray(grid)


def _scatter(points: Tensor, size: int = 256, limit: float = 3.0) -> np.ndarray:
    """2D points as black dots on a white square of side ``size`` over ``[-limit, limit]^2``."""
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    pixels = ((points.float().clamp(-limit, limit) + limit) / (2 * limit) * (size - 1)).round().long()
    for x, y in pixels.tolist():
        image[max(0, size - 1 - y - 1): size - y + 1, max(0, x - 1): x + 2] = 0
    return image


def write_validation(folder: Path, global_step: int, samples: Tensor, grid: np.ndarray | None) -> Path | None:
    """Write the samples and their grid (if any) under ``folder``; the grid's path."""
    from PIL import Image
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    stem = f"step-{global_step:08d}"
    atomic_write(folder / f"{stem}.safetensors", lambda tmp: save_file({"samples": samples.contiguous()}, str(tmp)))
    if grid is None:
        return None
    path = folder / f"{stem}.png"
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
    return path
