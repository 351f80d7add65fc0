"""One optimiser step of a stage, and the stage teacher it learns from.

Per micro-batch of real data ``x0`` (see :mod:`.batches` for times and noise):

    x_start = sqrt(abar(t_start)) x0 + sqrt(1 - abar(t_start)) eps
    x_end   = stage teacher's solve from (x_start, t_start) to t_end   (frozen, no gradients)
    v_tgt   = (x_end - x_start) / (t_end - t_start),  x_t = x_start + (t - t_start) v_tgt
    loss    = aligned_v_loss(student velocity at (x_t, t) towards t_end, v_tgt, alpha, beta)

Targets are made online for each batch. Condition dropout (probability ``cond_dropout``)
replaces a sample's condition by the null condition for teacher and student alike; the null
condition of a sample (also the unconditional branch of guidance) keeps the leaves named by
``setup.keep_on_dropout`` from the sample (:func:`~proreflow.conditioning.null_like`).
The loop over a stage's steps is :class:`~proreflow.training.runner.StageRunner`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import Cond, map_cond, null_like, select_cond
from ..losses import aligned_v_loss
from ..schedules import compute_dtype
from ..targets import StageTeacher, make_reflow_batch
from ..teachers import Denoiser, Network
from ..windows import TimeWindows
from .batches import BatchPlan, sample_randomness
from .ema import EMA
from .optim import set_stage_hyperparameters
from .recipes import Recipe, Stage
from .setup import DistillationSetup


class NonFiniteLossError(RuntimeError):
    """Too many optimiser steps of a stage had a non-finite loss (``max_nonfinite``)."""


class CountingNetwork:
    """A frozen network that counts its evaluations (one per sample per call) and runs under
    ``autocast`` (a context factory, e.g. ``accelerator.autocast``)."""

    def __init__(self, network: Network, autocast: Callable[[], Any] = contextlib.nullcontext):
        self.network, self.autocast, self.count = network, autocast, 0

    def __call__(self, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        self.count += x.shape[0]
        with self.autocast():
            return self.network(x, timestep, cond)

    def take(self) -> int:
        """Evaluations since the last call."""
        count, self.count = self.count, 0
        return count


def as_teacher(module: nn.Module, device=None, dtype: torch.dtype | None = None) -> nn.Module:
    """Put a teacher in eval mode on ``device``, cast to ``dtype`` if given (in place).

    Teachers run under ``torch.no_grad`` (:func:`make_reflow_batch`), so they are frozen
    whatever their ``requires_grad`` flags; those are left alone, since a copy of the original
    teacher's flags says what the student trains.
    """
    return module.eval().to(device=device, dtype=dtype)


def build_stage_teacher(setup: DistillationSetup, recipe: Recipe, index: int, original: nn.Module,
                        previous: nn.Module | None, dtype: torch.dtype | None = None,
                        autocast: Callable[[], Any] = contextlib.nullcontext) -> tuple[StageTeacher, CountingNetwork]:
    """Stage ``index``'s teacher and its evaluation counter.

    original teacher: ``solver_steps`` steps of ``solver`` per window, guided when baked.
    previous student (``previous``, frozen EMA weights of stage ``index - 1``): piecewise
    straight over the previous windows; crossing a window of this stage takes ``solver_steps``
    Euler steps (by default one per old window), unguided (its guidance is already baked in).
    """
    stage = recipe.stages[index]
    if stage.teacher == "previous":
        if previous is None:
            raise ValueError(f"stage {index + 1} learns from the previous student, which was not given")
        module, windows = previous, TimeWindows(recipe.stages[index - 1].windows)
    else:
        module, windows = original, None
    denoiser = setup.denoiser(module, dtype=dtype)
    counter = CountingNetwork(denoiser.network, autocast)
    teacher = StageTeacher(dataclasses.replace(denoiser, network=counter), stage.solver_steps, windows,
                           stage.teacher_guidance(), stage.solver)
    return teacher, counter


@dataclass
class StageContext:
    """Everything a stage's optimiser step needs."""

    accelerator: Any
    recipe: Recipe
    index: int
    setup: DistillationSetup
    student: nn.Module            # as prepared by accelerate (DDP / autocast wrapper)
    module: nn.Module             # the unwrapped student, whose parameters the EMA follows
    student_denoiser: Denoiser    # over ``student``
    optimizer: torch.optim.Optimizer
    ema: EMA
    teacher: StageTeacher
    counter: CountingNetwork
    plan: BatchPlan
    uncond: Cond = None

    @property
    def stage(self) -> Stage:
        return self.recipe.stages[self.index]

    def check_condition(self, cond: Cond) -> None:
        """Clear errors for guidance and dropout settings that the data cannot serve."""
        stage, where = self.stage, f"stages.{self.index}"
        if self.teacher.guidance != 1.0 and (self.uncond is None or cond is None):
            raise ValueError(f"{where}.guidance: baking guidance {stage.guidance} into the targets needs "
                             "conditioned data and setup.uncond; set guidance: 1.0 for this setup")
        if stage.cond_dropout > 0 and (self.uncond is None or cond is None):
            raise ValueError(f"{where}.cond_dropout: condition dropout needs conditioned data and "
                             "setup.uncond; set cond_dropout: 0.0 for this setup")


@dataclass
class StepResult:
    """One optimiser step, reduced over processes. ``loss`` is nan when the step was skipped.
    ``seconds``: wall-clock time of the step (set by :class:`~proreflow.training.runner.StageRunner`)."""

    loss: float
    scalars: dict[str, float]
    nonfinite: bool
    teacher_evals: int
    samples: int
    seconds: float = 0.0


def train_step(ctx: StageContext, batches: Iterator[tuple[Tensor, Cond]], step: int) -> StepResult:
    """Optimiser step ``step`` (0-based) of the stage: accumulate, check finiteness, clip, step, EMA.

    A non-finite loss on any process skips the update on all of them (gradients discarded).
    """
    acc, stage = ctx.accelerator, ctx.stage
    lr = set_stage_hyperparameters(ctx.optimizer, stage, step + 1)
    windows = TimeWindows(stage.windows)
    # sums over micro-batches: loss, mse, direction, magnitude, non-finite count, teacher evaluations
    sums = torch.zeros(6, dtype=torch.float64)
    for micro in range(stage.grad_accum):
        x0, cond = next(batches)
        ctx.check_condition(cond)
        x0 = x0.to(acc.device)
        cond = map_cond(lambda c: c.to(acc.device), cond)
        dtype = compute_dtype(x0)
        t, keep, noise = sample_randomness(ctx.plan.positions(step, micro), ctx.recipe.seed, ctx.index,
                                           tuple(x0.shape[1:]), dtype, stage.cond_dropout)
        t, keep, noise = t.to(acc.device), keep.to(acc.device), noise.to(acc.device)
        uncond = null_like(cond, ctx.uncond, ctx.setup.keep_on_dropout)  # each sample's null condition
        if stage.cond_dropout > 0:
            cond = select_cond(keep, cond, uncond)
        last = micro == stage.grad_accum - 1
        with contextlib.nullcontext() if last else acc.no_sync(ctx.student):
            batch = make_reflow_batch(x0, noise, windows, ctx.teacher, ctx.setup.schedule, cond, uncond, t=t)
            v_pred = ctx.student_denoiser.velocity(batch.x_t, batch.t, batch.t_end, cond)
            terms = aligned_v_loss(v_pred, batch.v_target, stage.alpha, stage.beta)
            acc.backward(terms.total / stage.grad_accum)
        parts = torch.stack([terms.total, terms.mse, terms.direction, terms.magnitude]).detach().double().cpu()
        finite = bool(torch.isfinite(parts).all())
        sums[:4] += parts if finite else 0.0
        sums[4] += 0.0 if finite else 1.0
        sums[5] += ctx.counter.take()
    if acc.num_processes > 1:
        sums = acc.reduce(sums.to(acc.device), "sum").cpu()
    micro_total = stage.grad_accum * acc.num_processes
    evals, samples = int(sums[5]), stage.batch_size
    if sums[4] > 0:
        ctx.optimizer.zero_grad(set_to_none=True)
        return StepResult(float("nan"), {"lr": lr}, True, evals, samples)
    scalars = {"lr": lr, "mse": float(sums[1]) / micro_total, "direction": float(sums[2]) / micro_total,
               "magnitude": float(sums[3]) / micro_total}
    if stage.grad_clip > 0:
        scalars["grad_norm"] = float(acc.clip_grad_norm_(ctx.student.parameters(), stage.grad_clip))
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.ema.update(ctx.module, step + 1)
    return StepResult(float(sums[0]) / micro_total, scalars, False, evals, samples)
