"""The training engine: run a distillation recipe on a :class:`DistillationSetup`.

    from proreflow.training import train
    result = train("proreflow-ii", setup, "runs/demo")   # stages 8 -> 4 -> 2 windows
    x = proreflow.sample(result.student, noise, result.windows, steps=2, guidance=result.guidance)

Modules: ``engine`` (stages, resume), ``runner`` (the optimiser steps of a stage, in memory:
:class:`StageRunner`, :func:`run_steps`), ``stage`` (one optimiser step, stage teachers),
``batches`` (data and randomness per step), ``ema``, ``optim``, ``checkpoint`` (files on
disk, :func:`load_student`), ``report`` (progress, ``OUT/train.log``, accelerate's trackers, summaries),
``validation`` (grids of fixed-noise samples), ``recipes`` (stages and presets), ``setup``
(:class:`DistillationSetup`, all the engine knows of a model).
"""

from .checkpoint import latest_checkpoint
from .ema import EMA
from .environment import make_accelerator
from .progressive import TrainResult, train
from .report import StageCounters, StageSummary
from .setup import DistillationSetup, call_module
from .stage_runner import StageRunner, run_steps
from .step import NonFiniteLossError
from .student import load_student, read_student_info

__all__ = [
    "EMA", "DistillationSetup", "NonFiniteLossError", "StageCounters", "StageRunner", "StageSummary", "TrainResult",
    "call_module", "latest_checkpoint", "load_student", "make_accelerator", "read_student_info", "run_steps", "train",
]
