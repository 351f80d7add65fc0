"""SD3 pipelines as methods of :func:`proreflow.sd.t2i.evaluate`: the teacher's Euler-N and the student.

The teacher samples with its own ``FlowMatchEulerDiscreteScheduler`` at ``num_inference_steps=N``
(Euler-N, the flow analogue of the Stable Diffusion teacher's DDIM-N); a student with the same stock
scheduler at its window sigmas (:func:`proreflow.sd3.export.student_sigmas`). The noise is the
pipeline's latents; the output latents are decoded by the float32 VAE
(:meth:`~proreflow.sd3.pipeline.SD3Teacher.decode_latents`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..sd.t2i import PromptSampler
from .export import student_sigmas
from .pipeline import SD3Teacher


def _generate(pipe, noise: Tensor, prompts: Sequence[str], guidance: float, resolution: int, **steps) -> Tensor:
    latents = pipe(prompt=list(prompts), guidance_scale=guidance, height=resolution, width=resolution,
                   latents=noise.to(pipe.device, pipe.transformer.dtype), output_type="latent", **steps).images
    return (SD3Teacher(pipe, "pipeline").decode_latents(latents) + 1) / 2


def euler_sampler(pipe, steps: int, guidance: float, resolution: int | None = None,
                  name: str | None = None) -> PromptSampler:
    """The pipeline with its own Euler scheduler at ``steps`` steps (default name ``teacher Euler-N``)."""
    resolution = resolution or SD3Teacher(pipe, "teacher").resolution

    def generate(noise: Tensor, prompts: Sequence[str]) -> Tensor:
        return _generate(pipe, noise, prompts, guidance, resolution, num_inference_steps=steps)

    return PromptSampler(name or f"teacher Euler-{steps}", steps, generate)


def student_sampler(pipe, info: dict, steps: int, guidance: float, resolution: int | None = None,
                    name: str | None = None) -> PromptSampler:
    """A student pipeline (``load_sd3_student_pipeline``) at ``steps`` steps, its stock Euler at the window
    sigmas; a step count the student cannot take raises ValueError when called (``evaluate`` skips it)."""
    resolution = resolution or SD3Teacher(pipe, "student").resolution

    def generate(noise: Tensor, prompts: Sequence[str]) -> Tensor:
        sigmas = student_sigmas(pipe, info, steps, resolution)
        return _generate(pipe, noise, prompts, guidance, resolution, sigmas=sigmas)

    return PromptSampler(name or f"student {steps}-step", steps, generate)
