"""The process's environment: dtypes by name, accelerate's process state and accelerator, trackers, TF32,
and the checks of what this installation and launch can serve. Used by the engine, the model families
(to place a teacher before training) and the commands."""

from __future__ import annotations

from pathlib import Path

import torch

from .optim import check_optimizer
from .recipes import Recipe

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
"""Dtype names: torch's and accelerate's ``mixed_precision`` ones (the dtype frozen teachers are cast
to; none for 'no')."""


def as_dtype(value: str | torch.dtype) -> torch.dtype:
    """A torch dtype from ``float32`` / ``bf16`` / ``fp16`` (or a dtype)."""
    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[value]


def cpu_only() -> bool:
    """Whether this machine has no CUDA GPU and no Apple GPU (MPS)."""
    return not (torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()))


def process_state():
    """This process's ``accelerate.PartialState``, initialised as :func:`make_accelerator` initialises it.

    Setups that need the device or the process index before training (to place the teacher, to
    build a cache on the main process) call this, never a bare ``PartialState()``: the first one
    created fixes the state, and without ``cpu=True`` on a machine without GPU it stays a single
    process, so under ``torchrun`` every rank would train alone and write the same folder.
    """
    from accelerate import PartialState

    return PartialState(cpu=cpu_only())


TRACKERS = {"none": (), "tensorboard": ("tensorboard",), "wandb": ("wandb",), "all": ("tensorboard", "wandb")}
"""Recipe ``report_to`` -> accelerate's tracker names."""


def check_environment(recipe: Recipe) -> None:
    """A ValueError naming the fix for recipe settings this installation cannot serve: a tracker or
    the 8-bit optimiser whose package is missing (checked before anything loads)."""
    import importlib.util

    for name in TRACKERS[recipe.report_to]:
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"report_to: {recipe.report_to!r} needs the {name} package, which is not installed; "
                             f"pip install {name}, or choose another report_to")
    check_optimizer(recipe.optimizer)


def set_tf32(allow: bool) -> None:
    """TF32 for float32 matrix products and cuDNN convolutions on NVIDIA GPUs (torch's global flags, as
    diffusers' training scripts set them); on CPU the flags change nothing."""
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def make_accelerator(mixed_precision: str, report_to: str = "none", out_dir: str | Path | None = None):
    """An ``accelerate.Accelerator`` on GPU when there is one (else CPU, gloo for several processes);
    with the trackers of ``report_to`` (:data:`TRACKERS`) logging under ``out_dir``."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision and process_state().num_processes == 1:
        AcceleratorState._reset_state()  # a new single-process run in this interpreter, other precision
    trackers = list(TRACKERS[report_to])
    project = None
    if trackers:
        if out_dir is None:
            raise ValueError(f"report_to: {report_to!r} needs an output folder for the trackers")
        project = ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(Path(out_dir) / "tensorboard"))
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu_only(), log_with=trackers or None,
                       project_config=project)


def check_sharding(accelerator, shared: bool) -> None:
    """A ValueError naming the fix for FSDP settings the engine cannot train with: FSDP version 1 (the engine
    reads FSDP2's DTensor shards, :mod:`.sharding`), or a LoRA student that is the teacher's own network
    (``setup.teacher_view``: the teacher would run through the sharded student)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return
    if not accelerator.is_fsdp2:
        raise ValueError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                         "(FSDP_VERSION=2 under torchrun)")
    if shared:
        raise ValueError("FSDP shards a fully fine-tuned student; this setup trains LoRA layers on the teacher's "
                         "own network (one network in memory), which needs no sharding: train it without FSDP")


def fsdp_left_unused(accelerator) -> bool:
    """Whether accelerate's FSDP plugin was asked for (``ACCELERATE_USE_FSDP``, as ``accelerate launch
    --use_fsdp`` sets it) but the run does not shard: accelerate turns FSDP on only for several processes on
    GPUs (or other accelerators), and otherwise trains a full copy on each process without a word."""
    import os

    from accelerate.utils import DistributedType

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
    return asked and accelerator.distributed_type != DistributedType.FSDP
