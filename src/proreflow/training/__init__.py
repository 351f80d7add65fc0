"""The training engine: run a distillation recipe on a :class:`DistillationSetup`.

    from proreflow.training import train
    result = train("proreflow-ii", setup, "runs/demo")   # stages 8 -> 4 -> 2 windows
    x = proreflow.sample(result.student, noise, result.windows, steps=2, guidance=result.guidance)

Modules: ``engine`` (stages, resume), ``runner`` (the optimiser steps of a stage, in memory:
:class:`StageRunner`, :func:`run_steps`), ``stage`` (one optimiser step, stage teachers),
``batches`` (data and randomness per step), ``ema``, ``optim``, ``checkpoint`` (files on
disk, :func:`load_student`), ``report`` (progress, TensorBoard, summaries), ``setups``
(registry of named setups for ``proreflow train``).
"""

from .checkpoint import latest_checkpoint, load_student, read_student_info
from .ema import EMA
from .engine import TrainResult, train
from .report import StageCounters, StageSummary
from .runner import StageRunner, make_accelerator, run_steps
from .setup import DistillationSetup, call_module
from .setups import SETUPS, build_setup, register_setup
from .stage import NonFiniteLossError

__all__ = [
    "EMA", "SETUPS", "DistillationSetup", "NonFiniteLossError", "StageCounters", "StageRunner", "StageSummary",
    "TrainResult", "build_setup", "call_module", "latest_checkpoint", "load_student", "make_accelerator",
    "read_student_info", "register_setup", "run_steps", "train",
]
