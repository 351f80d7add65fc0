"""What the training engine needs to know about a teacher and its data, whatever the model.

Built-in datasets (small networks) and Stable Diffusion (diffusers UNets on cached latents)
both produce a ``DistillationSetup``; the engine (:mod:`proreflow.training`) never looks
inside the model or the data beyond this.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset

from ..conditioning import Cond
from ..flow import FlowSchedule
from ..schedules import DIFFUSION_PREDICTION_TYPES, VPSchedule
from ..teachers import Denoiser, Network


def call_module(module: nn.Module) -> Network:
    """The plain adapter: ``module(x, timestep, cond)``."""
    return lambda x, timestep, cond: module(x, timestep, cond)


@dataclass
class ValidationSet:
    """The conditions a run's validation grids are sampled for (recipe ``validation_every``).

    cond: the conditions as one batch (None: unconditional); labels: one caption per sample (its
    prompt), which also gives the number of samples.
    """

    cond: Cond
    labels: list[str]


@dataclass
class DistillationSetup:
    """A teacher network, its schedule, and training data.

    teacher_model: the teacher's network (frozen by the engine, never trained).
    prediction_type: the teacher's output type; a student copied from the teacher keeps it, a student
        from scratch may output another (:meth:`student_prediction_type`, recipe ``student_prediction``).
    dataset: items ``(x0, cond)`` in the space the networks see (images, or VAE latents);
        ``cond`` may be None, a tensor (class label, text states) or a dict of tensors. An item may
        be ``(x0, cond, skipped)`` instead, ``skipped`` naming the source items the dataset passed
        over to reach it (e.g. unreadable images); the engine counts them in the stage summary
        (``skipped_items``, ``skipped_item_names``), from loader worker processes too. A map-style
        dataset is read in a seeded permutation per epoch (:mod:`.batches`); a stream
        (:class:`~proreflow.training.streams.ShardStream` of webdataset shards,
        :class:`~proreflow.training.streams.IterableStream` of any iterable) in its own order.
    uncond: the null condition with batch size 1 (for guidance and condition dropout).
    adapter: turns a module into ``network(x, timestep, cond)`` (``diffusers_network`` for UNets).
    make_student: builds a fresh student network (training from scratch); None: copy the teacher.
    info: free-form description stored in checkpoints (dataset name, model id, ...).
    keep_on_dropout: dotted key paths of dict-condition leaves that a sample keeps when its
        condition is dropped (and in the unconditional branch of guidance); every other leaf
        becomes ``uncond``'s (:func:`~proreflow.conditioning.null_like`). The Stable Diffusion
        setup sets ``("added_cond_kwargs.time_ids",)`` for SDXL: dropout removes the text, not
        the image size and crop, as diffusers' SDXL training scripts do.
    teacher_view: one network in memory (LoRA): given the student, the original teacher as a view
        of it (e.g. the student with its adapters disabled). Then the student *is*
        ``teacher_model``, trained in place (build a new setup for a new run); None: the student
        is a copy and the teacher stays a separate frozen network.
    validation: the conditions of the validation grids (:class:`ValidationSet`); None: those of the
        dataset's first ``validation_samples`` items.
    decode: samples -> images ``N x C x H x W`` in [-1, 1] for the validation grids (e.g. the VAE of
        a latent model); None: samples shaped ``C x H x W`` (C = 1 or 3) are shown as they are.
    """

    teacher_model: nn.Module
    prediction_type: str
    schedule: VPSchedule | FlowSchedule
    dataset: Dataset
    uncond: Cond = None
    adapter: Callable[[nn.Module], Network] = call_module
    make_student: Callable[[], nn.Module] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    keep_on_dropout: tuple[str, ...] = ()
    teacher_view: Callable[[nn.Module], nn.Module] | None = None
    validation: ValidationSet | None = None
    decode: Callable[[Tensor], Tensor] | None = None

    def denoiser(self, module: nn.Module, dtype=None, prediction_type: str | None = None) -> Denoiser:
        """A Denoiser over ``module`` with the teacher's schedule and output type (or ``prediction_type``)."""
        return Denoiser(self.adapter(module), prediction_type or self.prediction_type, self.schedule, dtype=dtype)

    def student_prediction_type(self, student_prediction: str = "teacher", from_scratch: bool = False) -> str:
        """The student's output type for recipe ``student_prediction`` (``"teacher"``: the teacher's;
        ``"auto"``: ``"velocity"`` from scratch, else the teacher's).

        A copy of the teacher keeps the teacher's type: any other reading of the same network is another
        function, which would not start as the teacher's DDIM (and a fixed re-expression of the same output,
        e.g. epsilon read back as x0, is the same function with the same gradients: nothing to choose).
        A student from scratch may output the velocity directly, or any type the schedule converts.
        """
        if student_prediction == "auto":
            student_prediction = "velocity" if from_scratch else "teacher"
        wanted = self.prediction_type if student_prediction == "teacher" else student_prediction
        allowed = (("flow_velocity", "velocity") if isinstance(self.schedule, FlowSchedule)
                   else (*DIFFUSION_PREDICTION_TYPES, "velocity"))
        if wanted not in allowed:
            raise ValueError(f"student_prediction: {wanted!r} does not fit this setup's teacher "
                             f"({self.prediction_type!r}); use one of teacher, {', '.join(allowed)}")
        if wanted != self.prediction_type and not from_scratch:
            raise ValueError(f"student_prediction: {wanted!r} needs from_scratch: true (a student copied from the "
                             f"teacher outputs the teacher's {self.prediction_type!r}); or set student_prediction: "
                             "teacher")
        return wanted
