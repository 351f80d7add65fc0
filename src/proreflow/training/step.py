"""One optimiser step of a stage, and the stage teacher it learns from.

Per micro-batch of real data ``x0`` (see :mod:`.batches` for times and noise):

    x_start = sqrt(abar(t_start)) x0 + sqrt(1 - abar(t_start)) eps
    x_end   = stage teacher's solve from (x_start, t_start) to t_end   (frozen, no gradients)
    v_tgt   = (x_end - x_start) / (t_end - t_start),  x_t = x_start + (t - t_start) v_tgt
    loss    = aligned_v_loss(student velocity at (x_t, t) towards t_end, v_tgt, alpha, beta), its
              squared error in the stage's ``loss_space`` with ``loss_weighting`` (:mod:`proreflow.losses`)

With ``start_points: teacher`` both ends lie on the original teacher's trajectory from the item's noise
instead (:func:`teacher_start_batch`). Targets are made online for each batch, or read from the
recipe's ``target_cache`` (:mod:`.target_cache`). Condition dropout (probability ``cond_dropout``)
replaces a sample's condition by the null condition for teacher and student alike; the null
condition of a sample (also the unconditional branch of guidance) keeps the leaves named by
``setup.keep_on_dropout`` from the sample (:func:`~proreflow.conditioning.null_like`).
The loop over a stage's steps is :class:`~proreflow.training.stage_runner.StageRunner`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import Tensor, nn

from ..conditioning import Cond, map_cond, null_like, select_cond
from ..losses import FLOW_LOSS_SPACES, FLOW_LOSS_WEIGHTINGS, LossTerms, aligned_v_loss, time_weights, to_loss_space
from ..schedules import VPSchedule, compute_dtype
from ..solvers import solver_key
from ..targets import (
    ReflowBatch,
    StageTeacher,
    at_window_start,
    make_mixed_reflow_batch,
    make_reflow_batch,
    make_trajectory_batch,
    reflow_batch,
    teacher_trajectory,
)
from ..teachers import Denoiser, Network
from ..windows import TimeWindows
from .batches import BatchPlan, collate_items, sample_randomness, start_mask, trajectory_noise, window_counts
from .ema import EMA
from .optim import set_stage_hyperparameters
from .recipes import STAGE_KEYS, TARGET_KEYS, Recipe, Stage, check_batch_split, default_solver_steps
from .setup import DistillationSetup
from .sharding import any_dtensor, is_sharded, local
from .target_cache import BATCH_FIELDS, TargetCache, TrajectoryCache, cond_digests, schedule_digest, weights_digest

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

    def __call__(self, x: Tensor, timestep: Tensor, cond: Cond, *count) -> Tensor:
        self.count += x.shape[0]
        with self.autocast():
            return self.network(x, timestep, cond, *count)  # count: a step-conditioned network's window count

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
                        autocast: Callable[[], Any] = contextlib.nullcontext,
                        kind: str | None = None) -> tuple[StageTeacher, CountingNetwork]:
    """Stage ``index``'s teacher ``kind`` (default: the stage's ``teacher``; the extra window counts' is
    ``stage.extra_stage_teacher``) and its evaluation counter.

    original teacher: ``solver_steps`` steps of ``solver`` per window, guided when baked.
    previous student (``previous``, frozen EMA weights of stage ``index - 1``): piecewise
    straight over the previous windows; crossing a window of this stage takes ``solver_steps``
    Euler steps (by default one per old window), unguided (its guidance is already baked in).
    A teacher other than the stage's own (``extra_teacher``) takes its kind's default steps.
    """
    stage = recipe.stages[index]
    kind = kind or stage.teacher
    if kind == "previous":
        if previous is None:
            raise ValueError(f"stage {index + 1} learns from the previous student, which was not given")
        module, windows = previous, TimeWindows(recipe.stages[index - 1].windows)
        prediction_type = setup.student_prediction_type(recipe.resolved_student_prediction, recipe.from_scratch)
    else:
        module, windows, prediction_type = original, None, setup.prediction_type
    steps = (stage.solver_steps if kind == stage.teacher
             else default_solver_steps(stage, kind, windows.count if windows is not None else None))
    denoiser = setup.denoiser(module, dtype=dtype, prediction_type=prediction_type)
    counter = CountingNetwork(denoiser.network, autocast)
    teacher = StageTeacher(dataclasses.replace(denoiser, network=counter), steps, windows,
                           stage.teacher_guidance(kind), stage.solver if kind == "original" else "ddim")
    return teacher, counter


def require_conditions(stage: Stage, where: str) -> None:
    """The error for a stage that bakes guidance or drops conditions where there are none (no ``setup.uncond``
    or unconditioned data); nothing for a stage that needs no conditions."""
    if stage.teacher_guidance() != 1.0:
        raise ValueError(f"{where}.guidance: baking guidance {stage.guidance} into the targets needs "
                         "conditioned data and setup.uncond; set guidance: 1.0 for this setup")
    if stage.cond_dropout > 0:
        raise ValueError(f"{where}.cond_dropout: condition dropout needs conditioned data and "
                         "setup.uncond; set cond_dropout: 0.0 for this setup")


def check_setup_fits(recipe: Recipe, setup: DistillationSetup, num_processes: int = 1) -> None:
    """Clear errors, before anything trains, for settings of any stage that ``setup`` cannot serve."""
    if recipe.step_conditioning and setup.shares_network(recipe.from_scratch):
        raise ValueError("step_conditioning: a LoRA student shares the teacher's network, and its time embedding's "
                         "offsets would reach the teacher too; train a full student (no LoRA) or set "
                         "step_conditioning: false")
    setup.student_prediction_type(recipe.resolved_student_prediction, recipe.from_scratch)
    if len(setup.dataset) < 1:
        raise ValueError("the setup's training dataset is empty")
    zero_terminal_snr = isinstance(setup.schedule, VPSchedule) and float(setup.schedule.abar(torch.tensor(1.0))) == 0
    if zero_terminal_snr and setup.prediction_type == "epsilon":
        raise ValueError("an epsilon teacher cannot start at pure noise on a zero-terminal-SNR schedule (abar(1) = 0: "
                         "x0 = (x - eps) / sqrt(abar) is undefined there); use a v_prediction teacher or a schedule "
                         "without zero terminal SNR")
    for index, stage in enumerate(recipe.stages):
        where = f"stages.{index}"
        if setup.uncond is None:
            require_conditions(stage, where)
        if not isinstance(setup.schedule, VPSchedule):
            for key, value, allowed in (("loss_space", stage.loss_space, FLOW_LOSS_SPACES),
                                        ("loss_weighting", stage.loss_weighting, FLOW_LOSS_WEIGHTINGS)):
                if value not in allowed:
                    raise ValueError(f"{where}.{key}: {value!r} needs a VP diffusion teacher, and this setup's "
                                     f"teacher is flow matching; set {key}: {allowed[0]}")
        elif stage.loss_weighting == "start_epsilon" and zero_terminal_snr:
            raise ValueError(f"{where}.loss_weighting: 'start_epsilon' gives the windows that start at pure noise "
                             "weight 0 with a zero-terminal-SNR teacher (abar(1) = 0, where the epsilon space's "
                             "weight vanishes); set loss_weighting: none")
        check_batch_split(where, stage.batch_size, stage.grad_accum, num_processes)


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
    trajectories: TrajectoryCache | None = None  # likewise, for start_points: teacher
    extra_teacher: StageTeacher | None = None  # the extra window counts' teacher, where it is another one
    extra_counter: CountingNetwork | None = None

    def take_evaluations(self) -> int:
        """Teacher evaluations (both stage teachers) since the last call."""
        return self.counter.take() + (self.extra_counter.take() if self.extra_counter is not None else 0)

    @property
    def stage(self) -> Stage:
        return self.recipe.stages[self.index]

    def check_condition(self, cond: Cond) -> None:
        """Clear errors for guidance and dropout settings that the data cannot serve."""
        if self.uncond is None or cond is None:
            require_conditions(self.stage, f"stages.{self.index}")


@dataclass
class StepResult:
    """One optimiser step, reduced over processes. ``loss`` is nan when the step was skipped.
    ``seconds``: wall-clock time of the step (set by :class:`~proreflow.training.stage_runner.StageRunner`).
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
    reference = 1.0 / stage.windows if stage.extra_windows else None  # several counts: one scale (time_weights)
    weights = time_weights(stage.loss_weighting, batch.t, batch.t_start, batch.t_end, space[1], schedule,
                           stage.snr_gamma, reference)
    return aligned_v_loss(v_pred, batch.v_target, stage.alpha, stage.beta, space_pred=space[0],
                          space_target=space[1], mse_weights=weights)


STEP_TOTALS = ("loss", "mse", "direction", "magnitude", "nonfinite", "teacher_evals", "skipped_items")
"""What one optimiser step sums over its micro-batches and processes (float64; ``nonfinite``: micro-batches
whose loss was not finite)."""


def train_step(ctx: StageContext, batches: Iterator[tuple[Tensor, Cond, list[str]]], step: int) -> StepResult:
    """Optimiser step ``step`` (0-based) of the stage: accumulate, check finiteness, clip, step, EMA.

    A non-finite loss on any process, or a non-finite gradient norm, skips the update on all of them
    (gradients discarded; parameters, optimiser state and EMA unchanged). Raises
    :class:`NonFiniteLossError` if an update from a finite gradient made a weight non-finite.
    """
    acc, stage = ctx.accelerator, ctx.stage
    lr = set_stage_hyperparameters(ctx.optimizer, stage, step + 1)
    windows = TimeWindows(stage.windows)
    sums = dict.fromkeys(STEP_TOTALS, 0.0)
    skipped: list[str] = []
    sharded = is_sharded(ctx.module)
    for micro in range(stage.grad_accum):
        x0, cond, names = next(batches)
        skipped += names
        sums["skipped_items"] += len(names)
        ctx.check_condition(cond)
        x0 = x0.to(acc.device)
        cond = map_cond(lambda c: c.to(acc.device), cond)
        dtype = compute_dtype(x0)
        positions = ctx.plan.positions(step, micro)
        t, keep, noise = sample_randomness(positions, ctx.recipe.seed, ctx.index,
                                           tuple(x0.shape[1:]), dtype, stage.cond_dropout)
        t, keep, noise = t.to(acc.device), keep.to(acc.device), noise.to(acc.device)
        counts = window_counts(positions, ctx.recipe.seed, ctx.index, (stage.windows, *stage.extra_windows))
        uncond = null_like(cond, ctx.uncond, ctx.setup.keep_on_dropout)  # each sample's null condition
        if stage.cond_dropout > 0:
            cond = select_cond(keep, cond, uncond)
        # gradients sync at the last micro-batch; FSDP2 reduce-scatters every one: unsynced, it would hold the
        # full gradients between micro-batches, which sharding is there to avoid
        sync = micro == stage.grad_accum - 1 or sharded
        with contextlib.nullcontext() if sync else acc.no_sync(ctx.student):
            def make(x0=x0, noise=noise, cond=cond, uncond=uncond, t=t, counts=counts):
                if stage.extra_windows:
                    return make_mixed_reflow_batch(x0, noise, counts, windows, ctx.teacher, ctx.setup.schedule,
                                                   cond, uncond, t, extra_teacher=ctx.extra_teacher)
                return make_reflow_batch(x0, noise, windows, ctx.teacher, ctx.setup.schedule, cond, uncond, t=t)

            def make_counted(make=make):
                return make(), ctx.take_evaluations()

            if stage.start_points == "teacher":
                batch, evals = teacher_start_batch(ctx, positions, x0, cond, uncond, t), ctx.take_evaluations()
            elif ctx.recipe.target_cache and stage.teacher == "original" and not stage.extra_windows:
                ctx.targets = ctx.targets or target_cache(ctx)
                batch, evals = ctx.targets.batch(step, micro, make_counted, x0)
                batch = ReflowBatch(**{k: getattr(batch, k).to(acc.device) for k in BATCH_FIELDS})
            else:
                batch, evals = make_counted()
            if stage.start_share:
                batch = at_window_start(batch, start_mask(positions, stage.start_share))
            student = ctx.student_denoiser.at_windows(counts.to(acc.device))
            v_pred = student.velocity(batch.x_t, batch.t, batch.t_end, cond)
            terms = stage_loss(stage, batch, v_pred, ctx.setup.schedule)
            acc.backward(terms.total / stage.grad_accum)
        parts = dict(zip(("loss", "mse", "direction", "magnitude"), torch.stack(
            [terms.total, terms.mse, terms.direction, terms.magnitude]).detach().double().cpu().tolist()))
        finite = all(math.isfinite(value) for value in parts.values())
        for name, value in parts.items():
            sums[name] += value if finite else 0.0
        sums["nonfinite"] += 0.0 if finite else 1.0
        sums["teacher_evals"] += evals
    if acc.num_processes > 1:
        summed = acc.reduce(torch.tensor([sums[k] for k in STEP_TOTALS], dtype=torch.float64, device=acc.device),
                            "sum")
        sums = dict(zip(STEP_TOTALS, summed.cpu().tolist()))
        if sums["skipped_items"] > 0:  # every process knows this, so all of them gather
            skipped = [name for names in gather_object([skipped]) for name in names]
    skipped.sort()  # a step's names in an order that does not depend on the process layout
    micro_total = stage.grad_accum * acc.num_processes
    evals, samples = int(sums["teacher_evals"]), stage.batch_size
    if sums["nonfinite"] > 0:
        ctx.optimizer.zero_grad(set_to_none=True)
        return StepResult(float("nan"), {"lr": lr}, True, evals, samples, skipped_items=skipped)
    scalars = {"lr": lr, **{name: sums[name] / micro_total for name in ("mse", "direction", "magnitude")}}
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
    return StepResult(sums["loss"] / micro_total, scalars, False, evals, samples, skipped_items=skipped)


def teacher_start_batch(ctx: StageContext, positions: range, x0: Tensor, cond: Cond, uncond: Cond, t: Tensor
                        ) -> ReflowBatch:
    """The batch of a ``start_points: teacher`` micro-batch: the pairs of its items' teacher trajectories
    (:mod:`proreflow.targets`), read from the target cache when the recipe has one (built on first use),
    else solved from each item's noise up to its window's end."""
    stage = ctx.stage
    windows, edges = TimeWindows(stage.windows), TimeWindows(ctx.recipe.trajectory_windows(ctx.index))
    indices = ctx.plan.indices(positions)
    if ctx.recipe.target_cache:
        ctx.trajectories = ctx.trajectories or trajectory_cache(ctx)
        x_start, x_end = ctx.trajectories.pairs(indices, *windows.edge_indices(t.cpu(), edges), cond)
        return reflow_batch(x_start.to(x0.device), x_end.to(x0.device), t, windows)
    noise = trajectory_noise(indices, ctx.recipe.seed, tuple(x0.shape[1:]), compute_dtype(x0)).to(x0.device)
    steps = stage.solver_steps * stage.windows // edges.count
    return make_trajectory_batch(noise, windows, ctx.teacher, edges, steps, t, cond, uncond)


def target_cache(ctx: StageContext) -> TargetCache:
    """The stage's reflow-batch cache, keyed by what its batches depend on (:class:`.target_cache.TargetCache`)."""
    stage, acc = ctx.stage, ctx.accelerator
    keys = {key: getattr(stage, key) if key in STAGE_KEYS else getattr(ctx.recipe, key) for key in TARGET_KEYS}
    # the values the teacher's solve sees: the solver by its canonical name, the guidance it is guided with
    # (cfg_sync's scale is the sampler's, not the targets')
    keys.update(solver=solver_key(stage.solver), guidance=stage.teacher_guidance())
    parts = (keys, ctx.index, acc.num_processes, len(ctx.setup.dataset))
    return TargetCache(ctx.recipe.target_cache, ctx.setup.teacher_tensors(), parts, ctx.setup.schedule,
                       acc.process_index)


def trajectory_settings(ctx: StageContext) -> dict[str, Any]:
    """What stage ``ctx.index``'s teacher trajectories depend on (:mod:`.target_cache`): its key's material."""
    stage, recipe, setup = ctx.stage, ctx.recipe, ctx.setup
    edges = recipe.trajectory_windows(ctx.index)
    denoiser = ctx.teacher.denoiser
    item_shape = list(torch.as_tensor(setup.dataset[0][0]).shape)
    uncond = cond_digests(ctx.uncond, 1)[0].numpy().tobytes().hex() if ctx.uncond is not None else None
    return {"teacher": weights_digest(setup.teacher_tensors()), "prediction_type": denoiser.prediction_type,
            "schedule": schedule_digest(setup.schedule), "time_scale": denoiser.time_scale, "windows": edges,
            "solver": stage.solver, "steps_per_window": stage.solver_steps * stage.windows // edges,
            "guidance": ctx.teacher.guidance, "uncond": uncond, "keep_on_dropout": list(setup.keep_on_dropout),
            "seed": recipe.seed, "items": len(setup.dataset), "item_shape": item_shape,
            "mixed_precision": recipe.mixed_precision}


def trajectory_cache(ctx: StageContext) -> TrajectoryCache:
    """The original teacher's trajectories of stage ``ctx.index`` (:class:`.target_cache.TrajectoryCache`),
    its missing shards solved here (their evaluations counted by ``ctx.counter``)."""
    settings, device = trajectory_settings(ctx), ctx.accelerator.device
    edges, steps = TimeWindows(settings["windows"]), settings["steps_per_window"]

    def solve(indices: list[int]) -> tuple[Tensor, Tensor]:
        x0, cond, _ = collate_items([ctx.setup.dataset[j] for j in indices])
        ctx.check_condition(cond)
        digests = cond_digests(cond, len(indices))
        cond = map_cond(lambda c: c.to(device), cond)
        uncond = null_like(cond, ctx.uncond, ctx.setup.keep_on_dropout)
        noise = trajectory_noise(indices, ctx.recipe.seed, tuple(x0.shape[1:]), compute_dtype(x0))
        path = teacher_trajectory(ctx.teacher, noise.to(device), edges, steps, cond, uncond)
        return path.transpose(0, 1).cpu(), digests

    return TrajectoryCache(ctx.recipe.target_cache, settings, solve, ctx.plan.micro_batch, ctx.accelerator)


def nonfinite_parameters(module: nn.Module) -> int:
    """How many trainable parameter tensors of ``module`` hold a NaN or infinite value: those whose
    max-abs norm is not finite (one multi-tensor call and one host sync; a max cannot overflow). Of a
    module that FSDP2 shards, each process checks its shards and the flags are summed over processes,
    so every process counts the same tensors of the full weights."""
    params = [p.detach() for p in module.parameters() if p.requires_grad]
    if not params:
        return 0
    norms = torch.stack([n.float() for n in torch._foreach_norm([local(p) for p in params], float("inf"))])
    bad = (~torch.isfinite(norms)).float()
    if any_dtensor(params):  # FSDP2 shards
        torch.distributed.all_reduce(bad)
    return int(bad.gt(0).sum())
