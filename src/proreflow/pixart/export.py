"""Export a PixArt student as a stock ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline`` folder.

The teacher's pipeline with the student's transformer (LoRA merged) and diffusers' own
``DDIMScheduler`` set to the student's sampler (:func:`~proreflow.sd.scheduler.trailing_ddim`:
trailing spacing, ``set_alpha_to_one=False``, no clipping), written by the Stable Diffusion family's
:func:`~proreflow.sd.export.export_pipeline`. Sampled with ``num_inference_steps`` equal to the
student's windows it is :func:`proreflow.sample` stepped once per window (the timesteps
``t * T - 1`` of :mod:`proreflow.schedules`), up to float rounding, where proreflow is not installed::

    pipe = PixArtAlphaPipeline.from_pretrained(DIR)   # or PixArtSigmaPipeline
    pipe(prompt, num_inference_steps=W, guidance_scale=info["guidance"], height=r, width=r)

One exception, the pipeline's own: at ``num_inference_steps=1`` PixArt pipelines return the DDIM
step's ``pred_original_sample`` (the x0 prediction at t = 1), not its ``prev_sample`` at
``alphas_cumprod[0]`` (``proreflow.sample``'s end): ``x0_hat`` instead of ``sqrt(abar_0) x0_hat +
sqrt(1 - abar_0) eps_hat``, with ``sqrt(1 - abar_0) = 0.01`` for PixArt's betas. PixArt-alpha 1024
(size conditions) was distilled at ``resolution``: sample at that ``height`` / ``width``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..sd.export import export_pipeline, load_run_student, read_export_info
from .pipeline import PixArtTeacher

__all__ = ["export_pixart_pipeline", "load_run_student", "read_export_info"]


def export_pixart_pipeline(student: nn.Module, teacher: PixArtTeacher, out_dir: str | Path, num_windows: int,
                           guidance: float = 1.0, resolution: int | None = None, extra: dict | None = None,
                           dtype: torch.dtype | None = None, metrics: list[dict] | None = None) -> Path:
    """Save the teacher's pipeline with ``student`` as its transformer and the stock DDIM of the student
    (module doc); ``proreflow.json`` also names the ``resolution`` to sample at (default the pipeline's)."""
    info = {"resolution": resolution or teacher.resolution, **(extra or {})}
    return export_pipeline(student, teacher, out_dir, num_windows, guidance, info, dtype, metrics,
                           component="transformer")
