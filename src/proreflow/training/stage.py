"""One optimiser step of a stage, and the stage teacher it learns from.

Per micro-batch of real data ``x0`` (see :mod:`.batches` for times and noise):

    x_start = sqrt(abar(t_start)) x0 + sqrt(1 - abar(t_start)) eps
    x_end   = stage teacher's solve from (x_start, t_start) to t_end   (frozen, no gradients)
    v_tgt   = (x_end - x_start) / (t_end - t_start),  x_t = x_start + (t - t_start) v_tgt
    loss    = aligned_v_loss(student velocity at (x_t, t) towards t_end, v_tgt, alpha, beta), its
              squared error in the stage's ``loss_space`` with ``loss_weighting`` (:mod:`proreflow.losses`)

Targets are made online for each batch. Condition dropout (probability ``cond_dropout``)
replaces a sample's condition by the null condition for teacher and student alike; the null
condition of a sample (also the unconditional branch of guidance) keeps the leaves named by
``setup.keep_on_dropout`` from the sample (:func:`~proreflow.conditioning.null_like`).
The loop over a stage's steps is :class:`~proreflow.training.runner.StageRunner`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import Tensor, nn

from ..conditioning import Cond, map_cond, null_like, select_cond
from ..files import atomic_write
from ..losses import LossTerms, aligned_v_loss, time_weights, to_loss_space
from ..schedules import compute_dtype
from ..targets import ReflowBatch, StageTeacher, at_window_start, make_reflow_batch
from ..teachers import Denoiser, Network
from ..windows import TimeWindows
from .batches import BatchPlan, sample_randomness, start_mask
from .ema import EMA
from .optim import set_stage_hyperparameters
from .recipes import Recipe, Stage
from .setup import DistillationSetup

MAX_GRAD_NORM = float(torch.finfo(torch.float32).max) ** 0.5
"""A step whose gradient norm is not below this is skipped: its square (AdamW's second moment)
would overflow float32, and a NaN or infinite norm means a non-finite gradient."""


class NonFiniteLossError(RuntimeError):
    """A stage cannot go on with finite weights: too many optimiser steps had a non-finite loss or
    gradient (``max_nonfinite``), every step of it was skipped, or an update made weights non-finite."""


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
    teacher's flags says what the student trains. ``dtype`` is passed on only when given: diffusers'
    ``ModelMixin.to`` warns about float32 modules whenever a ``dtype`` keyword is present, even None.
    """
    return module.eval().to(device=device, **({} if dtype is None else {"dtype": dtype}))


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
        prediction_type = setup.student_prediction_type(recipe.student_prediction, recipe.from_scratch)
    else:
        module, windows, prediction_type = original, None, setup.prediction_type
    denoiser = setup.denoiser(module, dtype=dtype, prediction_type=prediction_type)
    counter = CountingNetwork(denoiser.network, autocast)
    teacher = StageTeacher(dataclasses.replace(denoiser, network=counter), stage.solver_steps, windows,
                           stage.teacher_guidance(), stage.solver)
    return teacher, counter


def check_setup_fits(recipe: Recipe, setup: DistillationSetup, num_processes: int = 1) -> None:
    """Clear errors, before anything trains, for settings of any stage that ``setup`` cannot serve."""
    if recipe.from_scratch and setup.make_student is None:
        raise ValueError("from_scratch: true needs a setup with make_student (a builder of a fresh network); "
                         "this setup only has a teacher to copy: set from_scratch: false")
    setup.student_prediction_type(recipe.student_prediction, recipe.from_scratch)
    if len(setup.dataset) < 1:
        raise ValueError("the setup's training dataset is empty")
    for index, stage in enumerate(recipe.stages):
        where = f"stages.{index}"
        if setup.uncond is None and stage.teacher_guidance() != 1.0:
            raise ValueError(f"{where}.guidance: baking guidance {stage.guidance} into the targets needs "
                             "conditioned data and setup.uncond; set guidance: 1.0 for this setup")
        if setup.uncond is None and stage.cond_dropout > 0:
            raise ValueError(f"{where}.cond_dropout: condition dropout needs conditioned data and "
                             "setup.uncond; set cond_dropout: 0.0 for this setup")
        if stage.batch_size % (stage.grad_accum * num_processes):
            raise ValueError(f"{where}.batch_size: a global batch of {stage.batch_size} does not split into "
                             f"{stage.grad_accum} accumulation step(s) x {num_processes} process(es); use a "
                             f"multiple of {stage.grad_accum * num_processes}")


_BATCH_FIELDS = tuple(f.name for f in dataclasses.fields(ReflowBatch))


class TargetCache:
    """Reflow batches of an original-teacher stage on disk, reused by later runs (recipe ``target_cache``).

    A batch depends only on the teacher, the stage's windows / solver and its steps / guidance / dropout, the
    recipe seed, the stage index, the batch layout and the stream position (:mod:`.batches`), so runs that
    differ in anything else (loss, learning rate, EMA, step count) share them: the teacher's solve, most of
    an original-teacher stage's cost, is paid once. Files: ``root/<key>/<step>-<micro>-<rank>.pt``, where
    ``key`` hashes all of the above and the teacher's weights.
    """

    def __init__(self, root: str | Path, ctx: StageContext):
        stage, acc = ctx.stage, ctx.accelerator
        digest = hashlib.blake2b(digest_size=10)
        for name, tensor in sorted(ctx.setup.teacher_model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        parts = (stage.windows, stage.solver, stage.solver_steps, stage.teacher_guidance(), stage.guidance_mode,
                 stage.cond_dropout, ctx.recipe.seed, ctx.index, stage.batch_size, stage.grad_accum, acc.num_processes,
                 ctx.recipe.mixed_precision, len(ctx.setup.dataset))
        digest.update(repr(parts).encode())
        self.folder, self.rank = Path(root) / digest.hexdigest(), acc.process_index

    def batch(self, step: int, micro: int, make: Callable[[], ReflowBatch], counter: CountingNetwork
              ) -> tuple[ReflowBatch, int]:
        """The cached batch of ``(step, micro)`` and the teacher evaluations it cost, made and stored on a miss."""
        path = self.folder / f"{step}-{micro}-{self.rank}.pt"
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            return ReflowBatch(**{k: saved[k] for k in _BATCH_FIELDS}), int(saved["teacher_evals"])
        batch = make()
        evals = counter.take()
        self.folder.mkdir(parents=True, exist_ok=True)
        saved = {**{k: getattr(batch, k).cpu() for k in _BATCH_FIELDS}, "teacher_evals": evals}
        atomic_write(path, lambda tmp: torch.save(saved, tmp))
        return batch, evals


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
    targets: TargetCache | None = None  # made on the first step when the recipe sets target_cache

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
    ``seconds``: wall-clock time of the step (set by :class:`~proreflow.training.runner.StageRunner`).
    ``skipped_items``: names of the data items the dataset skipped to fill the step's batches
    (:func:`~proreflow.training.batches.collate_items`), over all processes, sorted."""

    loss: float
    scalars: dict[str, float]
    nonfinite: bool
    teacher_evals: int
    samples: int
    seconds: float = 0.0
    skipped_items: list[str] = field(default_factory=list)


def stage_loss(stage: Stage, batch, v_pred: Tensor, schedule) -> LossTerms:
    """The stage's loss of ``v_pred`` against ``batch.v_target`` (its loss space and time weighting)."""
    space = [to_loss_space(v, batch.x_t, batch.t, batch.t_end, stage.loss_space, schedule, stage.c_cap)
             for v in (v_pred, batch.v_target)]
    weights = time_weights(stage.loss_weighting, batch.t, batch.t_start, space[1], schedule, stage.snr_gamma)
    return aligned_v_loss(v_pred, batch.v_target, stage.alpha, stage.beta, space_pred=space[0],
                          space_target=space[1], mse_weights=weights)


def train_step(ctx: StageContext, batches: Iterator[tuple[Tensor, Cond, list[str]]], step: int) -> StepResult:
    """Optimiser step ``step`` (0-based) of the stage: accumulate, check finiteness, clip, step, EMA.

    A non-finite loss on any process, or a non-finite gradient norm, skips the update on all of them
    (gradients discarded; parameters, optimiser state and EMA unchanged). Raises
    :class:`NonFiniteLossError` if an update from a finite gradient made a weight non-finite.
    """
    acc, stage = ctx.accelerator, ctx.stage
    lr = set_stage_hyperparameters(ctx.optimizer, stage, step + 1)
    windows = TimeWindows(stage.windows)
    # sums over micro-batches: loss, mse, direction, magnitude, non-finite count, teacher evaluations,
    # skipped data items
    sums = torch.zeros(7, dtype=torch.float64)
    skipped: list[str] = []
    for micro in range(stage.grad_accum):
        x0, cond, names = next(batches)
        skipped += names
        sums[6] += len(names)
        ctx.check_condition(cond)
        x0 = x0.to(acc.device)
        cond = map_cond(lambda c: c.to(acc.device), cond)
        dtype = compute_dtype(x0)
        positions = ctx.plan.positions(step, micro)
        t, keep, noise = sample_randomness(positions, ctx.recipe.seed, ctx.index,
                                           tuple(x0.shape[1:]), dtype, stage.cond_dropout)
        t, keep, noise = t.to(acc.device), keep.to(acc.device), noise.to(acc.device)
        uncond = null_like(cond, ctx.uncond, ctx.setup.keep_on_dropout)  # each sample's null condition
        if stage.cond_dropout > 0:
            cond = select_cond(keep, cond, uncond)
        last = micro == stage.grad_accum - 1
        with contextlib.nullcontext() if last else acc.no_sync(ctx.student):
            def make(x0=x0, noise=noise, cond=cond, uncond=uncond, t=t):
                return make_reflow_batch(x0, noise, windows, ctx.teacher, ctx.setup.schedule, cond, uncond, t=t)

            if ctx.recipe.target_cache and stage.teacher == "original":
                ctx.targets = ctx.targets or TargetCache(ctx.recipe.target_cache, ctx)
                batch, evals = ctx.targets.batch(step, micro, make, ctx.counter)
                batch = ReflowBatch(**{k: getattr(batch, k).to(acc.device) for k in _BATCH_FIELDS})
            else:
                batch, evals = make(), ctx.counter.take()
            if stage.start_share:
                batch = at_window_start(batch, start_mask(positions, stage.start_share))
            v_pred = ctx.student_denoiser.velocity(batch.x_t, batch.t, batch.t_end, cond)
            terms = stage_loss(stage, batch, v_pred, ctx.setup.schedule)
            acc.backward(terms.total / stage.grad_accum)
        parts = torch.stack([terms.total, terms.mse, terms.direction, terms.magnitude]).detach().double().cpu()
        finite = bool(torch.isfinite(parts).all())
        sums[:4] += parts if finite else 0.0
        sums[4] += 0.0 if finite else 1.0
        sums[5] += evals
    if acc.num_processes > 1:
        sums = acc.reduce(sums.to(acc.device), "sum").cpu()
        if sums[6] > 0:  # every process knows this, so all of them gather
            skipped = [name for names in gather_object([skipped]) for name in names]
    skipped.sort()  # a step's names in an order that does not depend on the process layout
    micro_total = stage.grad_accum * acc.num_processes
    evals, samples = int(sums[5]), stage.batch_size
    if sums[4] > 0:
        ctx.optimizer.zero_grad(set_to_none=True)
        return StepResult(float("nan"), {"lr": lr}, True, evals, samples, skipped_items=skipped)
    scalars = {"lr": lr, "mse": float(sums[1]) / micro_total, "direction": float(sums[2]) / micro_total,
               "magnitude": float(sums[3]) / micro_total}
    # the norm of the (all-reduced, unscaled) gradient; max_norm = inf measures it and scales by exactly 1
    grad_norm = float(acc.clip_grad_norm_(ctx.student.parameters(), stage.grad_clip or float("inf")))
    scalars["grad_norm"] = grad_norm
    if not grad_norm < MAX_GRAD_NORM:
        if acc.scaler is not None:
            ctx.optimizer.step()  # the grad scaler saw the overflow: it skips the update and lowers its scale
        ctx.optimizer.zero_grad(set_to_none=True)
        return StepResult(float("nan"), {"lr": lr, "grad_norm": grad_norm}, True, evals, samples,
                          skipped_items=skipped)
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    bad = nonfinite_parameters(ctx.module)
    if bad:
        raise NonFiniteLossError(f"stage {ctx.index + 1}, step {step + 1}: the update made {bad} of the student's "
                                 "weights non-finite (from a finite gradient); the run stopped and nothing was "
                                 "written with them. Lower lr or weight_decay, then continue with --resume.")
    ctx.ema.update(ctx.module, step + 1)
    return StepResult(float(sums[0]) / micro_total, scalars, False, evals, samples, skipped_items=skipped)


def nonfinite_parameters(module: nn.Module) -> int:
    """How many trainable parameter tensors of ``module`` hold a NaN or infinite value: those whose
    max-abs norm is not finite (one multi-tensor call and one host sync; a max cannot overflow)."""
    params = [p.detach() for p in module.parameters() if p.requires_grad]
    if not params:
        return 0
    norms = torch.stack([n.float() for n in torch._foreach_norm(params, float("inf"))])
    return int((~torch.isfinite(norms)).sum())
