"""diffusers integration: :class:`ProReflowScheduler`, pipeline and LoRA export."""

from .scheduler import ProReflowScheduler, ProReflowSchedulerOutput

__all__ = ["ProReflowScheduler", "ProReflowSchedulerOutput"]
