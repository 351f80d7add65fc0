"""What the training engine needs to know about a teacher and its data, whatever the model.

Built-in datasets (small networks) and Stable Diffusion (diffusers UNets on cached latents)
both produce a ``DistillationSetup``; the engine (:mod:`proreflow.training`) never looks
inside the model or the data beyond this.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset

from ..conditioning import Cond
from ..flow import FlowSchedule
from ..schedules import DIFFUSION_PREDICTION_TYPES, VPSchedule
from ..step_conditioning import conditioned_denoiser
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
    section: the config's ``setup:`` section it was built from, its name and keys as given (set by
        :func:`~proreflow.commands.named_setups.build_setup`); None for a setup built in code. Part of
        the run's :func:`setup_identity`.
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
    section: dict[str, Any] | None = None
    section_defaults: dict[str, Any] | None = None

    def denoiser(self, module: nn.Module, dtype=None, prediction_type: str | None = None) -> Denoiser:
        """A Denoiser over ``module`` with the teacher's schedule and output type (or ``prediction_type``),
        step-conditioned when ``module`` is (:mod:`proreflow.step_conditioning`)."""
        denoiser = Denoiser(self.adapter(module), prediction_type or self.prediction_type, self.schedule, dtype=dtype)
        return conditioned_denoiser(denoiser, module)

    def teacher_tensors(self) -> dict[str, Tensor]:
        """The original teacher's weights by name. With ``teacher_view`` (one network in memory, the teacher a
        view of the student) only the frozen tensors: the trainable ones (the adapters) change from stage to
        stage."""
        model = self.teacher_model
        trainable = ({name for name, p in model.named_parameters() if p.requires_grad}
                     if self.teacher_view is not None else set())
        return {name: tensor for name, tensor in model.state_dict().items() if name not in trainable}

    def shares_network(self, from_scratch: bool) -> bool:
        """Whether the student is the teacher's network (``teacher_view``, LoRA) rather than a copy or a fresh one."""
        return self.teacher_view is not None and not from_scratch

    def student_prediction_type(self, student_prediction: str = "teacher", from_scratch: bool = False) -> str:
        """The student's output type for recipe ``student_prediction`` as resolved
        (:attr:`~proreflow.training.recipes.Recipe.resolved_student_prediction`; ``"teacher"``: the teacher's).

        A copy of the teacher keeps the teacher's type: any other reading of the same network is another
        function, which would not start as the teacher's DDIM (and a fixed re-expression of the same output,
        e.g. epsilon read back as x0, is the same function with the same gradients: nothing to choose).
        A student from scratch may output the velocity directly, or any type the schedule converts.
        """
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


RUN_ONLY_SETUP_KEYS = ("device", "progress", "num_workers", "cache_dir", "cache_batch_size", "compile",
                       "local_files_only", "force", "validation_prompts")
"""Setup keys that say where and how a run runs, not what it distills: a resume may change them."""

FINGERPRINT_KEYS = ("model", "teacher", "data", "dataset")
"""The keys of a setup's ``info`` that fingerprint what it distills: the model family, the teacher (a path or
hub id), the data (a path, or a built-in dataset's name)."""


def setup_identity(section: dict[str, Any] | None, info: dict[str, Any],
                   defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run distills, recorded in its checkpoints and compared on resume (JSON values).

    ``section``: the ``setup:`` section's name and keys as given, less :data:`RUN_ONLY_SETUP_KEYS`
    (left out when None: a setup built in code). The other keys are cheap fingerprints from the setup's
    ``info`` (:data:`FINGERPRINT_KEYS`; a built-in teacher, known by its ``teacher_path``, by the name of its
    cache entry, ``<data>-<hash of its config>``, wherever the cache lies); those ``info`` lacks are left
    out. ``defaults``: the builder's defaults of the section's keys, kept as ``section_defaults`` so that a key
    left out and a key given its default compare equal on resume. Nothing is read from disk.
    """
    identity: dict[str, Any] = {}
    if section is not None:
        identity["section"] = {key: value for key, value in section.items() if key not in RUN_ONLY_SETUP_KEYS}
        if defaults:
            identity["section_defaults"] = defaults
    identity.update({key: info[key] for key in FINGERPRINT_KEYS if key in info})
    if "teacher" not in identity and isinstance(info.get("teacher_path"), str):
        identity["teacher"] = Path(info["teacher_path"]).name
    return json.loads(json.dumps(identity, default=str))  # as meta.json will read back
