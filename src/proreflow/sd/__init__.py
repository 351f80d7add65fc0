"""The Stable Diffusion family (SD1.5 / SD2.x / SDXL through diffusers): pipeline loading, captions
and shards, the latent cache, the setup builder, LoRA, export, :class:`ProReflowScheduler` and
text-to-image evaluation (FID, CLIP score, COCO)."""

from .scheduler import ProReflowScheduler, ProReflowSchedulerOutput

__all__ = ["ProReflowScheduler", "ProReflowSchedulerOutput"]
