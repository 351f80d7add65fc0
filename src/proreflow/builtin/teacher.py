"""Teachers for the built-in datasets, cached and reused: DDPM (epsilon prediction) or flow matching.

``TeacherConfig.teacher`` picks the kind; one training loop serves both, only the loss differs
(:func:`teacher_loss`).

DDPM (``teacher: ddpm``, the default): training minimises ``E || net(x_t, tau, c) - eps ||^2`` with ``t ~ U(0, 1]``,
``x_t = sqrt(abar(t)) x0 + sqrt(1 - abar(t)) eps`` and ``tau = max(t * T - 1, 0)``: the same
continuous-time convention the samplers use (:mod:`proreflow.schedules`; teachers cached under the
former ``tau = t * (T - 1)`` stay valid: the pairs ``(tau, abar[tau])`` they learned are the same), on Stable
Diffusion's noise schedule (``scaled_linear``, betas 0.00085..0.012, T = 1000). Class labels
are replaced by the null class with probability ``cond_dropout`` (10 %), so classifier-free
guidance works. Image teachers may train with offset noise (Guttenberg 2023),
``eps = n + offset_noise * d`` with ``n ~ N(0, I)`` and ``d ~ N(0, 1)`` per image and channel,
constant over pixels: SD's schedule keeps ``sqrt(abar(1)) = 0.068`` of the signal at t = 1, so a
network can read an image's mean brightness off ``x_1``, which the sampler's start ``N(0, I)``
lacks; MNIST (mostly black) then comes out on grey backgrounds. Offset noise hides that mean.

Flow matching (``teacher: flow``): training minimises ``E || net(x_sigma, 1000 sigma, c) - (eps - x0) ||^2``
on the straight path ``x_sigma = (1 - sigma) x0 + sigma eps`` (diffusers' ``FlowMatchEulerDiscreteScheduler``
conventions, shift 1, :class:`~proreflow.flow.FlowSchedule`), with ``sigma ~ U(0, 1]`` drawn exactly as the
DDPM teachers draw t. Uniform, not SD3's logit-normal density: logit-normal rarely visits sigma near 1, the
point every one-step-per-window student and the teacher's first Euler step start from, and uniform keeps
the two kinds of teacher comparable (same draws, same network, same budget). Offset noise is off by
default: the path ends in pure noise (``x_1 = eps``), so there is no mean brightness to leak.

AdamW, linear warm-up then cosine decay of the learning rate, gradient clipping, and an EMA
of the weights with decay ``min(ema_decay, (1 + n) / (10 + n))`` after ``n`` updates; the EMA
weights are the teacher.

A trained teacher is stored under ``<cache>/teachers/<data>-<hash of config>/`` (flow:
``<data>-flow-<hash>``; a DDPM config hashes as it did before the kind existed, so cached DDPM teachers stay valid)
(:mod:`proreflow.builtin.store`); :func:`load_or_train_teacher` reuses it and
:func:`builtin_setup` hands it to the distillation engine as a :class:`DistillationSetup`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from ..conditioning import select_cond
from ..flow import FLOW_PREDICTION_TYPE, FlowSchedule
from ..schedules import VPSchedule
from ..targets import sample_times
from ..teachers import Denoiser
from ..training.setup import DistillationSetup
from .data import get_spec, load_dataset
from .fitting import fit_record, fit_steps
from .networks import adapter_for_spec, build_network, mlp_spec, small_unet
from .store import load_or_fit

KIND = "teachers"
FORMAT = 1  # bump when training code changes what a config produces
TEACHER_KINDS = ("ddpm", "flow")
"""``ddpm``: epsilon prediction on SD's VP schedule; ``flow``: flow matching (``u = eps - x0``,
:mod:`proreflow.flow`)."""
SAMPLER_NAMES = {"ddpm": "DDIM", "flow": "Euler"}
"""What ``sample(teacher, noise, TimeWindows(n), n)`` is for each kind: DDIM-n, or flow-matching Euler-n."""
VP_ONLY = ("beta_schedule", "beta_start", "beta_end")
"""Settings a flow teacher does not use (left out of its cache key)."""


@dataclass(frozen=True)
class TeacherConfig:
    """Everything that determines a trained teacher (its hash names the cache entry)."""

    data: str
    network: dict[str, Any]
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    offset_noise: float = 0.0
    seed: int = 0
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    teacher: str = "ddpm"

    def schedule(self) -> VPSchedule | FlowSchedule:
        if self.teacher == "flow":
            return FlowSchedule(1.0, num_train_timesteps=self.num_train_timesteps)
        return VPSchedule.from_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)

    @property
    def prediction_type(self) -> str:
        return FLOW_PREDICTION_TYPE if self.teacher == "flow" else "epsilon"

    def to_dict(self) -> dict[str, Any]:
        """The cache key's content: a DDPM config as before the kind existed (no ``teacher`` key), a flow
        config with ``teacher: flow`` and without the VP schedule's settings."""
        values = dataclasses.asdict(self)
        for key in (("teacher",) if self.teacher == "ddpm" else VP_ONLY):
            del values[key]
        return {**values, "format": FORMAT}


_TOY = dict(network=mlp_spec((2,), width=128, depth=3), steps=10_000, batch_size=256, lr=2e-3)
DEFAULTS: dict[str, dict[str, Any]] = {
    "checkerboard": _TOY,
    "8gaussians": _TOY,
    "moons": _TOY,
    "digits": dict(network=mlp_spec((1, 8, 8), num_classes=10, width=256, depth=3), steps=4000,
                   batch_size=128, lr=1e-3),
    "mnist": dict(network=small_unet(10), steps=3000, batch_size=64, lr=2e-3, offset_noise=0.1),
}
"""Default teacher per dataset. CPU time of one core (torch 2.13): 2D sets about 95 s, digits about
75 s, MNIST about 520 s. DDIM-32 samples with guidance 2 are classified as their label 100 %
(digits) and 97 % (MNIST, the classifier's own held-out accuracy) of the time."""
FLOW_DEFAULTS: dict[str, Any] = {"offset_noise": 0.0}
"""What a flow teacher sets differently from :data:`DEFAULTS` (no offset noise: module doc)."""


def teacher_config(data: str, **overrides: Any) -> TeacherConfig:
    """The default config for ``data`` with ``overrides`` (None values are ignored)."""
    get_spec(data)
    given = {k: v for k, v in overrides.items() if v is not None}
    kind = given.get("teacher", "ddpm")
    if kind not in TEACHER_KINDS:
        raise ValueError(f"setup.teacher: unknown teacher kind {kind!r}; use one of {', '.join(TEACHER_KINDS)}")
    vp_only = [key for key in VP_ONLY if key in given]
    if kind == "flow" and vp_only:
        raise ValueError(f"setup.{vp_only[0]}: a flow teacher has no VP noise schedule; drop {vp_only[0]} "
                         "or use teacher: ddpm")
    values = {**DEFAULTS[data], **(FLOW_DEFAULTS if kind == "flow" else {}), **given}
    names = {f.name for f in dataclasses.fields(TeacherConfig)} - {"data"}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TypeError(f"unknown teacher setting(s) {unknown}; known: {sorted(names)}")
    for key, value in values.items():
        _check_setting(key, value)
    return TeacherConfig(data=data, **values)


SETTING_LIMITS = {"steps": (1, 10**7), "batch_size": (1, 65536), "lr": (0, 1), "weight_decay": (0, 1),
                  "warmup": (0, 10**7), "grad_clip": (0, 1e6), "ema_decay": (0, 0.999999), "cond_dropout": (0, 1),
                  "offset_noise": (0, 10), "seed": (0, 2**63 - 1), "beta_start": (0, 1), "beta_end": (0, 1),
                  "num_train_timesteps": (2, 100_000)}
"""Bounds of the teacher's numeric settings (beyond them training hangs, runs out of memory or diverges)."""


def _check_setting(key: str, value: Any) -> None:
    expected = {f.name: f.type for f in dataclasses.fields(TeacherConfig)}[key]
    if key not in SETTING_LIMITS:
        return
    whole = expected in (int, "int")
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        raise ValueError(f"setup.{key}: expected {'an integer' if whole else 'a number'}, got {value!r}")
    low, high = SETTING_LIMITS[key]
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"setup.{key}: must be a finite number in [{low}, {high}], got {value!r}")


@dataclass
class TrainedTeacher:
    """A teacher network (EMA weights, eval mode, frozen) with its config and cache entry;
    ``trained``: trained by this call (else loaded from the cache)."""

    module: nn.Module
    config: TeacherConfig
    path: Path
    stats: dict[str, Any] = field(default_factory=dict)
    trained: bool = False

    @property
    def schedule(self) -> VPSchedule | FlowSchedule:
        return self.config.schedule()

    def denoiser(self) -> Denoiser:
        """The teacher as a :class:`Denoiser` of its prediction type (``sample(..., TimeWindows(n), n)`` is
        its DDIM-n, or Euler-n for a flow teacher)."""
        return Denoiser(adapter_for_spec(self.config.network)(self.module), self.config.prediction_type,
                        self.schedule)


def _ema_avg(decay: float):
    """``AveragedModel``'s average ``d * avg + (1 - d) * w``, ``d = min(decay, (1 + n) / (10 + n))``.

    The warm-up of :class:`proreflow.training.EMA`, kept on torch's ``AveragedModel`` on purpose: the
    EMA class computes ``lerp`` (other rounding) and starts from the initial weights where
    ``AveragedModel`` copies the first update, so moving to it would change every teacher this
    code trains, while cached teachers are found by their config alone.
    """

    def avg(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1 + int(num_averaged)) / (10 + int(num_averaged)))
        return d * averaged + (1 - d) * current

    return avg


def _lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up over ``warmup`` steps, times a cosine decay to 0 at ``steps``.

    Not ``diffusers.optimization.get_scheduler("cosine")``: that one starts at lr 0 and starts the
    cosine after the warm-up; the product here is what the cached teachers were trained with.
    """
    return min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * step / steps))


def teacher_loss(network, schedule: VPSchedule | FlowSchedule, prediction_type: str, x0: Tensor, noise: Tensor,
                 t: Tensor, cond=None) -> Tensor:
    """``mean (net(x_t, timestep(t), c) - target)^2``, ``x_t = schedule.add_noise(x0, eps, t)``; the target is
    ``eps`` (epsilon: DDPM) or ``u = eps - x0`` (flow_velocity: flow matching, ``x_t = (1 - sigma) x0 + sigma eps``)."""
    target = noise - x0 if prediction_type == FLOW_PREDICTION_TYPE else noise
    return F.mse_loss(network(schedule.add_noise(x0, noise, t), schedule.timestep(t), cond), target)


def fit_teacher(config: TeacherConfig, device: str | torch.device = "cpu", progress: bool = True
                ) -> tuple[nn.Module, dict[str, Any]]:
    """Train a teacher from ``config``; returns the EMA module (cpu, eval, frozen) and stats."""
    spec = get_spec(config.data)
    if config.offset_noise and spec.is_2d:
        raise ValueError("offset_noise shifts whole images: use it for image datasets only")
    data = load_dataset(config.data, "train", seed=config.seed)
    x_all = data.x.to(device)
    labels = None if data.labels is None else data.labels.to(device)
    uncond = None if spec.uncond is None else spec.uncond.to(device)
    schedule = config.schedule()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_network(config.network).to(device)
    ema = AveragedModel(model, avg_fn=_ema_avg(config.ema_decay), use_buffers=True)
    network = adapter_for_spec(config.network)(model)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config.warmup, config.steps))
    gen = torch.Generator().manual_seed(config.seed)

    def loss_of_batch(idx: torch.Tensor) -> torch.Tensor:
        x0 = x_all[idx]
        noise = torch.randn(x0.shape, generator=gen)
        if config.offset_noise:
            noise = noise + config.offset_noise * torch.randn(*x0.shape[:2], *[1] * (x0.ndim - 2), generator=gen)
        noise = noise.to(device)
        t = sample_times(config.batch_size, gen).to(device)
        cond = None
        if labels is not None:
            keep = torch.rand(config.batch_size, generator=gen).to(device) >= config.cond_dropout
            cond = select_cond(keep, labels[idx], uncond)
        return teacher_loss(network, schedule, config.prediction_type, x0, noise, t, cond)

    start = time.perf_counter()
    losses = fit_steps(model, loss_of_batch, opt, sched, steps=config.steps, batch_size=config.batch_size,
                       size=x_all.shape[0], generator=gen, device=device, grad_clip=config.grad_clip,
                       after_step=lambda: ema.update_parameters(model), desc=f"teacher {config.data}",
                       progress=progress)
    stats = {"train_seconds": round(time.perf_counter() - start, 2),
             "final_loss": sum(losses[-100:]) / max(len(losses[-100:]), 1), **fit_record(device)}
    return ema.module.cpu().eval().requires_grad_(False), stats


def load_or_train_teacher(data: str, *, steps: int | None = None, cache_dir: str | os.PathLike | None = None,
                          force: bool = False, device: str | torch.device = "cpu", progress: bool = True,
                          **overrides: Any) -> TrainedTeacher:
    """The cached teacher of built-in dataset ``data`` for this config (default config +
    ``steps`` and ``overrides``), or train and cache it (always with ``force``)."""
    config = teacher_config(data, steps=steps, **overrides)
    name = data if config.teacher == "ddpm" else f"{data}-{config.teacher}"
    entry = load_or_fit(KIND, name, config.to_dict(), config.network,
                        lambda: fit_teacher(config, device, progress), cache_dir, force)
    return TrainedTeacher(entry.module, config, entry.path, entry.record["stats"], entry.fitted)


def train_teacher(data: str, *, steps: int | None = None, cache_dir: str | os.PathLike | None = None,
                  device: str | torch.device = "cpu", progress: bool = True, **overrides: Any) -> TrainedTeacher:
    """Train the teacher of ``data`` and cache it, replacing any cached one with the same config."""
    return load_or_train_teacher(data, steps=steps, cache_dir=cache_dir, force=True, device=device,
                                 progress=progress, **overrides)


def builtin_setup(name: str, *, steps: int | None = None, cache_dir: str | os.PathLike | None = None,
                  force: bool = False, device: str | torch.device = "cpu", progress: bool = True,
                  from_scratch: bool = False, shift: float = 1.0, window_space: str = "sigma",
                  **overrides: Any) -> DistillationSetup:
    """The :class:`DistillationSetup` of built-in dataset ``name``: its (cached or trained) teacher with
    its schedule (SD's VP schedule; a :class:`FlowSchedule` with ``teacher="flow"``), the ``train``
    split, ``uncond = tensor([num_classes])`` (None for 2D).

    shift, window_space: a flow teacher's sampling schedule (:class:`FlowSchedule`): with
    ``window_space="unshifted"`` windows and steps are uniform in diffusers' unshifted ``s`` and
    ``sigma = shift s / (1 + (shift - 1) s)``, as SD3's sampler spaces them (``shift`` 3); the cached
    teacher is the same network (it learned the velocity at every sigma).

    from_scratch: set ``make_student`` to a freshly initialised network of the teacher's
    architecture (training from scratch); by default ``make_student`` is None and the engine
    starts the student from a copy of the teacher's weights.
    """
    teacher = load_or_train_teacher(name, steps=steps, cache_dir=cache_dir, force=force, device=device,
                                    progress=progress, **overrides)
    schedule = teacher.schedule
    if (shift, window_space) != (1.0, "sigma"):
        if not isinstance(schedule, FlowSchedule):
            raise ValueError("shift and window_space are a flow teacher's sampling schedule: set teacher: flow, "
                             "or leave them out")
        schedule = dataclasses.replace(schedule, shift=float(shift), window_space=window_space)
    spec = get_spec(name)
    make_student = (lambda: build_network(teacher.config.network)) if from_scratch else None
    return DistillationSetup(
        teacher_model=teacher.module, prediction_type=teacher.config.prediction_type, schedule=schedule,
        dataset=load_dataset(name, "train", seed=teacher.config.seed), uncond=spec.uncond,
        adapter=adapter_for_spec(teacher.config.network), make_student=make_student,
        info={"data": name, "teacher_path": str(teacher.path), "teacher_config": teacher.config.to_dict(),
              **({"shift": schedule.shift, "window_space": schedule.window_space}
                 if isinstance(schedule, FlowSchedule) else {}),
              "teacher_stats": teacher.stats, "shape": list(spec.shape), "num_classes": spec.num_classes},
    )


def builtin_setup_keys() -> tuple[str, ...]:
    """The keys of a built-in setup: :func:`builtin_setup`'s options and the teacher's settings
    (:class:`TeacherConfig`), which ``**overrides`` passes on."""
    params = inspect.signature(builtin_setup).parameters.values()
    own = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    return tuple(own + [f.name for f in dataclasses.fields(TeacherConfig) if f.name not in ("data", *own)])


builtin_setup.setup_keys = builtin_setup_keys  # checked (commands.named_setups) before anything is built
