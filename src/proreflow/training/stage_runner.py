"""Optimiser steps of one stage, in memory: :class:`StageRunner` and :func:`run_steps`.

:func:`~proreflow.training.train` runs each stage of a recipe through a :class:`StageRunner`
and adds what a run keeps (checkpoints, stage results, logs, resume). The runner alone writes
nothing to disk: it is the public way to run N optimiser steps of a stage, for throughput
measurements (``benchmarks/throughput.py``) or experiments::

    from proreflow.training import StageRunner, run_steps

    counters = run_steps("perflow", setup, stage_index=0, steps=10)  # StageCounters of the 10 steps
    runner = StageRunner("proreflow-i", setup, 0)
    runner.run(5)
    runner.run(5)                 # goes on where it stopped (steps 6 to 10 of the stage)
    runner.module, runner.ema     # the student's raw weights and their EMA

A standalone runner starts the student as :func:`train` starts stage 1 (a copy of the teacher,
or ``setup.make_student()`` with ``from_scratch``), whatever the stage; a stage whose teacher
is the previous student learns from the student's starting weights unless ``previous`` gives
other ones. Like :func:`train`, it puts the teacher network in eval mode on the device, in the
mixed-precision dtype, in place.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from ..conditioning import Cond, map_cond
from .batches import BatchPlan, micro_batches
from .checkpoint import frozen_names
from .ema import EMA
from .environment import DTYPES, check_sharding, make_accelerator, set_tf32
from .optim import make_optimizer
from .recipes import Recipe, Stage, load_recipe
from .report import StageCounters
from .setup import DistillationSetup
from .sharding import full_tensors
from .step import NonFiniteLossError, StageContext, StepResult, as_teacher, build_stage_teacher, train_step
from .streams import Stream, check_dataset
from .student import load_student_weights, student_module


def limit_dataset(setup: DistillationSetup, max_train_samples: int | None) -> DistillationSetup:
    """``setup`` whose dataset is its first ``max_train_samples`` items (all of them when it has fewer, or
    when ``max_train_samples`` is None): a ``torch.utils.data.Subset`` of indices 0..N-1, or a stream's
    :meth:`~proreflow.training.streams.Stream.limited`."""
    check_dataset(setup.dataset)
    if max_train_samples is None or max_train_samples >= len(setup.dataset):
        return setup
    if isinstance(setup.dataset, Stream):
        return dataclasses.replace(setup, dataset=setup.dataset.limited(max_train_samples))
    return dataclasses.replace(setup, dataset=Subset(setup.dataset, range(max_train_samples)))


def enable_gradient_checkpointing(module: nn.Module) -> None:
    """Turn on ``module.enable_gradient_checkpointing()`` (diffusers models, the built-in networks), or a
    ValueError naming the recipe key when the network has none."""
    enable = getattr(module, "enable_gradient_checkpointing", None)
    if not callable(enable):
        raise ValueError(f"gradient_checkpointing: the student network ({type(module).__name__}) has no "
                         "enable_gradient_checkpointing(); set gradient_checkpointing: false")
    enable()


def unsharded_student(setup: DistillationSetup, recipe: Recipe, weights: dict[str, Tensor]) -> nn.Module:
    """A new student network (:func:`~proreflow.training.student.student_module`) holding copies of the
    full ``weights`` in their dtypes (copies: the trained student's own tensors would be aliased), never
    sharded, whatever FSDP does to the trained one; frozen tensors ``weights`` leaves out keep the network's
    own (:func:`~.student.load_student_weights`)."""
    module = student_module(setup, recipe.from_scratch, recipe.seed, recipe.step_counts)
    load_student_weights(module, {key: value.detach().clone() for key, value in weights.items()}, assign=True)
    return module


@dataclass
class Trainee:
    """What the stages of a run share: the student and its optimiser, the original teacher.

    module: the unwrapped student (float32 master weights), whose parameters the optimiser and
        the EMA follow (DTensor shards under FSDP2). student: the same network as prepared by
        accelerate (DDP / FSDP2 / autocast).
    original: the original teacher network, frozen, on the device, in ``weight_dtype``.
    uncond: ``setup.uncond`` on the device.
    shared: one network in memory (``setup.teacher_view``): the student's frozen parameters are the
        teacher's weights, so they live in ``weight_dtype`` as any teacher's do (:func:`cast_frozen`),
        and the run's files leave them out (:meth:`saved`); only the trainable ones are float32.
    """

    accelerator: Any
    module: nn.Module
    student: nn.Module
    optimizer: torch.optim.Optimizer
    original: nn.Module
    uncond: Cond
    weight_dtype: torch.dtype | None
    shared: bool = False

    @staticmethod
    def is_shared(setup: DistillationSetup, recipe: Recipe) -> bool:
        """Whether the student is the teacher's network (:attr:`shared`): a ``teacher_view``, not from scratch."""
        return setup.shares_network(recipe.from_scratch)

    @classmethod
    def network(cls, setup: DistillationSetup, recipe: Recipe) -> nn.Module:
        """A fresh student as :meth:`prepare` makes it, before any weights load: a teacher copy or
        ``make_student()`` in float32, or with ``setup.teacher_view`` ``setup.teacher_model`` itself, its
        frozen parameters (the teacher's) cast to the mixed-precision dtype in place; with the recipe's
        gradient_checkpointing turned on."""
        shared = cls.is_shared(setup, recipe)
        weight_dtype = DTYPES.get(recipe.mixed_precision)
        module = setup.teacher_model if shared else student_module(setup, recipe.from_scratch, recipe.seed,
                                                                    recipe.step_counts)
        if any(p.dtype in (torch.float16, torch.bfloat16) for p in module.parameters()):
            module = module.float()  # optimiser master weights in float32
        if shared and weight_dtype is not None:
            cast_frozen(module, weight_dtype)
        if recipe.gradient_checkpointing:
            enable_gradient_checkpointing(module)
        return module

    @classmethod
    def prepare(cls, setup: DistillationSetup, recipe: Recipe, accelerator,
                weights: Iterable[dict[str, Tensor]] = (), module: nn.Module | None = None) -> Trainee:
        """A fresh student (``module``, default :meth:`network`), with ``weights`` loaded in order
        (:func:`~.student.load_student_weights`), prepared with its optimiser; the original teacher cast
        and moved in place, or with ``setup.teacher_view`` the teacher is a view of the student."""
        shared = cls.is_shared(setup, recipe)
        check_sharding(accelerator, shared)
        weight_dtype = DTYPES.get(recipe.mixed_precision)
        module = module if module is not None else cls.network(setup, recipe)
        for state in weights:
            load_student_weights(module, state)
        module.train()
        # together: FSDP2 (fully_shard) swaps the parameters for sharded ones and repoints the optimiser
        student, optimizer = accelerator.prepare(module, make_optimizer(module, recipe.optimizer))
        module = accelerator.unwrap_model(student)
        original = (setup.teacher_view(module) if shared
                    else as_teacher(setup.teacher_model, accelerator.device, weight_dtype))
        uncond = map_cond(lambda c: c.to(accelerator.device), setup.uncond)
        return cls(accelerator, module, student, optimizer, original, uncond, weight_dtype, shared)

    def saved(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """What the run's files hold of ``state``, a state dict of the student (its weights or its EMA
        student): all of it; with one network (:attr:`shared`) all but the frozen parameters, which are
        the teacher's, unchanged (and here in ``weight_dtype``): whoever loads the student takes them
        from the teacher, in its own dtype (:func:`~.student.load_student_weights`)."""
        if not self.shared:
            return state
        frozen = frozen_names(self.module)
        return {key: value for key, value in state.items() if key not in frozen}


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``module``'s frozen parameters (``requires_grad=False``) to ``dtype`` in place; the trainable
    ones stay as they are (float32 master weights).

    For a LoRA student that is its own teacher (``setup.teacher_view``) under mixed precision, as
    diffusers' LoRA training scripts keep the base in ``weight_dtype``: the frozen base is never
    updated, so it needs no float32 copy, and autocast computes with a bf16 / fp16 cast of it
    anyway (and saves that cast for the backward pass when the weight is float32; not when it
    already is the reduced dtype). What the frozen base then computes differs from a float32 one
    by the rounding of the weights that autocast does not cast itself (e.g. normalisation weights)
    and by the kernels (reduced-precision against mixed-dtype ones in the backward pass):
    ``tests/sd/test_sd_lora_mixed_precision.py`` measures both.
    """
    for p in module.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


class StageRunner:
    """Optimiser steps of stage ``index`` (0-based) of ``recipe`` on ``setup`` (module doc).

    accelerator: an ``accelerate.Accelerator`` whose mixed precision is the recipe's (default:
        :func:`make_accelerator`). trainee: the student to train (default: a fresh one,
        :meth:`Trainee.prepare`); :func:`train` passes its own, shared by the stages.
    previous: the previous stage's student weights, the stage teacher when the stage's teacher
        is 'previous' (default: the student's weights when the runner starts).
    start_step: optimiser steps of the stage already done (the data stream and the learning
        rate go on from there). counters: running totals to add to (default: fresh ones).

    Each runner starts a fresh EMA of the student's trainable parameters (:attr:`ema`) and
    clears the optimiser's state, as a stage does.
    """

    def __init__(self, recipe: Recipe | str | Path | dict, setup: DistillationSetup, index: int = 0,
                 accelerator=None, *, trainee: Trainee | None = None, previous: dict[str, Tensor] | None = None,
                 start_step: int = 0, counters: StageCounters | None = None):
        recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        if not 0 <= index < len(recipe.stages):
            raise IndexError(f"stage index {index}: the recipe has {len(recipe.stages)} stage(s) (0-based index)")
        if trainee is None:
            if accelerator is None:
                set_tf32(recipe.allow_tf32)
                accelerator = make_accelerator(recipe.mixed_precision)
            elif accelerator.mixed_precision != recipe.mixed_precision:
                raise ValueError(f"the accelerator runs mixed precision {accelerator.mixed_precision!r} but the "
                                 f"recipe says mixed_precision: {recipe.mixed_precision}")
            trainee = Trainee.prepare(setup, recipe, accelerator)
        elif accelerator is not None and accelerator is not trainee.accelerator:
            raise ValueError("give either a trainee or an accelerator: the trainee brings its own")
        acc = trainee.accelerator
        setup = limit_dataset(setup, recipe.max_train_samples)
        self.recipe, self.setup, self.index, self.trainee = recipe, setup, index, trainee
        stage = self.stage
        self.ema = EMA(trainee.module, stage.ema_decay)
        trainee.optimizer.state.clear()
        teacher_module = None
        if stage.uses_previous:  # a plain copy on every process, whether or not FSDP shards the student
            weights = previous if previous is not None else full_tensors(trainee.module.state_dict())
            teacher_module = unsharded_student(setup, recipe, weights).requires_grad_(False)
            teacher_module = as_teacher(teacher_module, acc.device, trainee.weight_dtype)
        teacher, counter = build_stage_teacher(setup, recipe, index, trainee.original, teacher_module,
                                               trainee.weight_dtype, acc.autocast)
        extra_teacher = extra_counter = None
        if stage.extra_stage_teacher != stage.teacher:
            extra_teacher, extra_counter = build_stage_teacher(setup, recipe, index, trainee.original, teacher_module,
                                                               trainee.weight_dtype, acc.autocast,
                                                               kind=stage.extra_stage_teacher)
        plan = BatchPlan(len(setup.dataset), recipe.seed, index, stage.batch_size, stage.grad_accum,
                         acc.num_processes, acc.process_index)
        student_type = setup.student_prediction_type(recipe.resolved_student_prediction, recipe.from_scratch)
        student = setup.denoiser(_Prepared(trainee.student, trainee.module), prediction_type=student_type)
        self.context = StageContext(acc, recipe, index, setup, trainee.student, trainee.module, student,
                                    trainee.optimizer, self.ema, teacher, counter, plan, trainee.uncond,
                                    extra_teacher=extra_teacher, extra_counter=extra_counter)
        source = setup.dataset  # a stream reads its own order (proreflow.training.streams), checks its workers
        read = source.micro_batches if isinstance(source, Stream) else partial(micro_batches, source)
        self._batches = read(plan, start_step, recipe.num_workers)
        self.step_index = start_step
        self.counters = counters if counters is not None else StageCounters()

    @property
    def stage(self) -> Stage:
        return self.recipe.stages[self.index]

    @property
    def module(self) -> nn.Module:
        """The unwrapped student (raw weights; :attr:`ema` holds their average)."""
        return self.trainee.module

    @property
    def student(self) -> nn.Module:
        """The student as prepared by accelerate (DDP / autocast wrapper)."""
        return self.trainee.student

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.trainee.optimizer

    @property
    def original(self) -> nn.Module:
        """The original teacher network (frozen, on the device, in the mixed-precision dtype)."""
        return self.trainee.original

    def step(self) -> StepResult:
        """One optimiser step (the stage's next): accumulate, clip, step, update the EMA; adds to
        :attr:`counters`. A non-finite loss or gradient skips the update and is counted, not raised."""
        if self._batches is None:
            raise RuntimeError("this StageRunner was closed")
        start = time.perf_counter()
        result = train_step(self.context, self._batches, self.step_index)
        result.seconds = time.perf_counter() - start
        self.step_index += 1
        self.counters.add(result)
        return result

    def run(self, steps: int) -> StageCounters:
        """``steps`` optimiser steps (they may go past the stage's ``steps``); the counters of these steps.

        Raises :class:`NonFiniteLossError` once ``max_nonfinite`` steps of the stage were skipped.
        """
        done = StageCounters()
        for _ in range(steps):
            result = self.step()
            done.add(result)
            if result.nonfinite and self.counters.skipped >= self.recipe.max_nonfinite:
                raise NonFiniteLossError(
                    f"stage {self.index + 1}, step {self.step_index}: {self.counters.skipped} optimiser steps had "
                    f"a non-finite loss or gradient (max_nonfinite={self.recipe.max_nonfinite})")
        return done

    def close(self) -> None:
        """Stop the data loader (its worker processes, if any)."""
        self._batches = None

    def __enter__(self) -> StageRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_steps(recipe: Recipe | str | Path | dict, setup: DistillationSetup, stage_index: int = 0,
              steps: int | None = None, accelerator=None) -> StageCounters:
    """Run ``steps`` optimiser steps (default: the stage's ``steps``) of stage ``stage_index`` of
    ``recipe`` on a fresh student, in memory (nothing written); returns their counters.

    The student starts as in :class:`StageRunner` (a copy of the teacher, or
    ``setup.make_student()``); :func:`~proreflow.training.train` runs whole recipes.
    """
    with StageRunner(recipe, setup, stage_index, accelerator) as runner:
        return runner.run(runner.stage.steps if steps is None else steps)


class _Prepared:
    """The prepared (DDP / autocast) student, looking like the plain module to ``setup.adapter``
    (which may read ``forward``'s signature or attributes such as ``config``)."""

    def __init__(self, prepared: nn.Module, module: nn.Module):
        self._prepared, self._module = prepared, module

    def __call__(self, *args, **kwargs):
        return self._prepared(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._module, name)
