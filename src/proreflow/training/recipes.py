"""Distillation recipes: a list of stages, loadable from YAML, with named presets.

A *stage* trains the student to be straight inside ``windows`` equal time windows, against a
stage teacher (the original diffusion teacher, or the previous stage's student), for
``steps`` optimiser steps. A *recipe* is the list of stages plus run-wide settings. Progressive
reflow is a recipe whose window counts halve, e.g. 8 -> 4 -> 2 (ProReflow-II).

YAML form (``configs/*.yaml``): recipe keys at the top level, shared stage settings under
``defaults`` (a stage's own keys win), the stages as a list::

    name: my-proreflow
    seed: 0
    defaults: {lr: 1.0e-4, batch_size: 64, alpha: 1.0}
    stages:
      - {windows: 8, steps: 1000}
      - {windows: 4, steps: 1000}                      # against the original teacher (the default)
      - {windows: 2, steps: 1000, teacher: previous}   # or against the stage-2 student

Overrides (``key=value``, the value read as YAML) edit that form before it is checked:
``seed=3``, ``stages.1.lr=5e-5`` (one stage), ``stages.*.lr=5e-5`` (every stage, even where it
sets its own), ``defaults.lr=5e-5`` (stages that do not set their own). Unknown keys, wrong
types, impossible schedules, non-finite numbers and values outside the bounds each key declares
(beyond which a run hangs, exhausts memory or trains NaN weights) raise :class:`RecipeError`
naming the key; so do YAML syntax errors, with file, line and column.

YAML 1.1 reads some unquoted words as other types: ``no`` / ``off`` / ``false`` and ``yes`` / ``on``
/ ``true`` are booleans, ``3`` and ``1.5`` numbers, ``2025-01-31`` a date. ``mixed_precision=no``
(a boolean false) means 'no'; any other string-valued key (``name``, ``description``,
``teacher``, ``guidance_mode``, ...) given such a value is an error that says to quote it
(``name: '2025'``, or ``name="'2025'"`` as an override). Numbers written as ``1e-4`` (a string
to YAML 1.1) are read as numbers.

Older recipes' ``tensorboard`` key is refused with its new spelling (``report_to``); the recipes recorded in
older runs' checkpoints still load (:func:`~proreflow.training.checkpoint.recorded_recipe`).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..losses import LOSS_SPACES, LOSS_WEIGHTINGS
from ..schedules import PREDICTION_TYPES
from ..solvers import REFERENCE_STEPS, SOLVERS
from ..windows import MAX_WINDOWS


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the key and the fix."""


def check_batch_split(where: str, batch_size: int, grad_accum: int, num_processes: int = 1) -> None:
    """A global batch splits evenly into ``grad_accum`` accumulation steps x ``num_processes`` processes:
    checked on the recipe alone (one process), again once the process count is known, and by the batch plan."""
    if batch_size % (grad_accum * num_processes):
        raise RecipeError(f"{where}.batch_size: a global batch of {batch_size} does not split into {grad_accum} "
                          f"accumulation step(s) x {num_processes} process(es); use a multiple of "
                          f"{grad_accum * num_processes}")


LR_SCHEDULES = ("constant_with_warmup", "constant", "linear", "cosine", "cosine_with_restarts", "polynomial")
"""The learning-rate schedules of ``diffusers.optimization.get_scheduler`` a stage may name (its
``piecewise_constant`` needs rules given as text, which a step count does not fit)."""
POLYNOMIAL_LR_END = 1e-7
"""Where diffusers' ``polynomial`` schedule ends (its ``lr_end``), absolute."""
REPORT_TO = ("none", "tensorboard", "wandb", "all")
OPTIMIZERS = ("adamw", "adamw_8bit")


def _key(group: str, text: str, *, main: bool = False, limits: tuple[float, float] | None = None,
         choices: tuple[str, ...] | None = None, below_one: bool = False, weights: bool = True,
         targets: bool = False, **kwargs) -> Any:
    """A recipe or stage key, declared once: ``group`` (where the reference lists it), ``text`` (its help),
    ``main`` (a key most users set, the rest are advanced), inclusive numeric ``limits`` (beyond them a run hangs,
    exhausts memory or trains NaN weights; a number without them must be finite and >= 0), ``choices``,
    ``below_one`` (in [0, 1)), ``weights`` (False: changing it does not change the weights a run trains, so a
    resume may change it freely), ``targets`` (the original teacher's reflow batches depend on it: part of the
    target cache's key, :func:`~proreflow.training.step.target_cache`). Every table below and
    ``docs/recipe-keys.md`` derive from these."""
    return field(metadata={"group": group, "help": text, "main": main, "limits": limits, "choices": choices,
                           "below_one": below_one, "weights": weights, "targets": targets}, **kwargs)


@dataclass
class Stage:
    """One stage of progressive reflow (see the module doc for YAML)."""

    windows: int = _key("windows", "number of equal time windows the student is made straight in", main=True,
                        limits=(1, MAX_WINDOWS), targets=True)
    steps: int = _key("windows", "optimiser steps in the stage (skipped non-finite steps included)", default=1000,
                      main=True, limits=(1, 10**8))
    extra_windows: list[int] = _key(
        "windows",
        "more window counts trained in this stage beside windows, each dividing it (e.g. [2, 1] with windows: "
        "4): every sample draws one of the stage's counts with equal chance and learns that count's target, "
        "solved on the same grid (solver_steps x windows / k steps per window of count k). With the recipe's "
        "step_conditioning the student knows the count it is run at: one student for several step counts",
        default_factory=list, limits=(1, MAX_WINDOWS))
    extra_teacher: str | None = _key(
        "windows",
        "stage teacher of the extra_windows counts, 'original' or 'previous' (default: the stage's teacher). "
        "'previous' beside teacher: original distils the smaller counts progressively: the previous stage's EMA "
        "student crosses their windows, one Euler step per its own window (a 1-window target from a 4-window "
        "student is its 4-step sample), while the stage's own count learns from the original teacher",
        default=None, choices=("original", "previous"))
    teacher: str = _key("windows", "stage teacher: 'original' (the diffusion teacher) or 'previous' "
                        "(the previous stage's EMA student)", default="original",
                        choices=("original", "previous"))
    solver_steps: int | None = _key(
        "targets", "teacher solver steps per window: DDIM steps for the original teacher (default "
        f"{REFERENCE_STEPS} // windows); Euler steps for a previous-stage teacher (default "
        "previous windows / windows: one step per old window)", default=None, main=True, limits=(1, 1000), targets=True)
    solver: str = _key("targets", "original teacher's window solver: 'ddim' (Euler for a velocity teacher; 1 "
                       "evaluation per step), 'dpmpp_2m' (DPM-Solver++(2M), 1 per step on a grid uniform in "
                       "log-SNR, diffusion teachers) or 'heun' (2 per step); a previous-stage teacher takes "
                       "Euler steps",
                       default="ddim", choices=SOLVERS, targets=True)
    alpha: float = _key("loss", "weight of the direction term 1 - cos(v_pred, v_target); 0 gives plain MSE",
                        default=1.0, main=True, limits=(0, 1000))
    beta: float = _key("loss", "weight of the magnitude term (|v_pred| - |v_target|)^2 / |v_target|^2", default=0.0,
                       limits=(0, 1000))
    loss_space: str = _key(
        "loss", "space of the squared error (direction and magnitude terms stay on velocities): 'velocity' "
        "mean((v_pred - v_tgt)^2); 'epsilon' (PeRFlow's noise matching) the same on the epsilons whose DDIM "
        "step to the window end is x_t + (t_end - t) v, i.e. the velocity error over c(t, t_end) = "
        "(sqrt(1 - abar_end) - sqrt(abar_end (1 - abar_t) / abar_t)) / (t_end - t); 'x0' on the implied "
        "x0 (the epsilon error times sqrt((1 - abar_t) / abar_t)); 'geometric' the velocity error^2 / c(t, t_end), "
        "the geometric mean of the velocity and epsilon squared errors; 'capped_epsilon' the velocity error^2 / "
        "min(c, c_cap)^2: epsilon space where c <= c_cap, scaled velocity space at the noisy window starts",
        default="velocity", choices=LOSS_SPACES)
    c_cap: float = _key("loss", "c_cap of loss_space: capped_epsilon", default=4.0)
    loss_weighting: str = _key(
        "loss", "per-sample weight of the squared error: 'none'; 'min_snr' min(SNR(t), snr_gamma) / SNR(t), "
        "SNR = abar / (1 - abar) (min-SNR-gamma, Hang et al. 2023); 'window' 1 / (mean squared target of "
        "the batch's samples in the same window); 'start_epsilon' c(h, 0)^2 / c(t_start, t_end)^2, h = t_start - "
        "t_end: each window weighted as the epsilon space weighs its start, relative to the window of the same "
        "length ending at 0 (weight 1); with loss_space: velocity, the epsilon space's balance between windows "
        "and the velocity space's profile inside each (the ProReflow presets' choice; VP teachers only)",
        default="none", main=True, choices=LOSS_WEIGHTINGS)
    snr_gamma: float = _key("loss", "gamma of loss_weighting: min_snr", default=5.0)
    start_points: str = _key(
        "targets", "where a window's start point x_start comes from: 'data' (forward-noised data, PeRFlow's choice) or "
        "'teacher' (the original teacher's trajectory from noise, solved window by window through the edges of "
        "the recipe's finest such stage, solver_steps x windows / K steps per fine window: x_start and x_end are "
        "its states at the window's edges; the dataset gives the conditions only). 'teacher' needs teacher: "
        "original (a trajectory of the original teacher is no target of a previous student), a one-step solver "
        "(ddim or heun) and cond_dropout 0; with target_cache the trajectories are solved once and read by every "
        "stage (docs/trajectories.md)", default="data", choices=("data", "teacher"))
    start_share: float = _key(
        "targets", "share of each batch's samples trained at their window's start (t = t_start, x_t = x_start) instead "
        "of at their uniform t inside the window: the times a sampler with one step per window evaluates. "
        "Sample p of the stage's stream is moved iff floor((p + 1) s) > floor(p s); the teacher's solves "
        "are unchanged", default=0.0, main=True, limits=(0, 1))
    lr: float = _key("optimizer", "AdamW learning rate (the peak of lr_schedule)", default=1e-4, main=True,
                     limits=(0, 1))
    lr_schedule: str = _key(
        "optimizer",
        "learning-rate schedule by diffusers' name (diffusers.optimization.get_scheduler): optimiser step k "
        "(1-based) of the stage runs at lr times the schedule's factor at step k, over the stage's steps; "
        "'constant_with_warmup' (the default) is lr * min(1, k / warmup_steps); 'constant' (no warm-up), 'linear', "
        "'cosine', 'cosine_with_restarts' (lr_num_cycles restarts), 'polynomial' (lr_power, down to 1e-7); "
        "the decaying ones reach 0 (1e-7) at the stage's last step", default="constant_with_warmup",
        choices=LR_SCHEDULES)
    warmup_steps: int = _key("optimizer", "linear learning-rate warm-up steps of lr_schedule (0: none)", default=0,
                             limits=(0, 10**8))
    lr_num_cycles: int = _key("optimizer", "hard restarts of lr_schedule: cosine_with_restarts", default=1,
                              limits=(1, 10**6))
    lr_power: float = _key("optimizer", "power of lr_schedule: polynomial (1: linear decay)", default=1.0,
                           limits=(1e-3, 1e3))
    weight_decay: float = _key("optimizer", "AdamW weight decay", default=1e-2, limits=(0, 1))
    adam_beta1: float = _key("optimizer", "AdamW beta1 (decay of the gradient's running mean)", default=0.9,
                             below_one=True)
    adam_beta2: float = _key("optimizer", "AdamW beta2 (decay of the squared gradient's running mean)", default=0.999,
                             below_one=True)
    adam_epsilon: float = _key("optimizer", "AdamW epsilon (added to the root of the second moment)", default=1e-8,
                               limits=(1e-30, 1))
    grad_clip: float = _key("optimizer", "clip the global gradient norm to this value (0: no clipping)", default=1.0,
                            limits=(0, 1e6))
    batch_size: int = _key("optimizer", "global batch per optimiser step, over all processes and accumulation steps",
                           default=64, main=True, limits=(1, 65536), targets=True)
    grad_accum: int = _key("optimizer", "gradient accumulation steps per optimiser step", default=1,
                           limits=(1, 4096), targets=True)
    ema_decay: float = _key("optimizer", "EMA of the student's weights: ema <- d_k * ema + (1 - d_k) * weights after "
                            "step k, d_k = min(ema_decay, (1 + k) / (10 + k))", default=0.999, main=True,
                            below_one=True)
    guidance: float = _key("guidance", "classifier-free guidance scale: baked into the targets ('baked'), or the "
                           "scale the student is sampled with ('cfg_sync')", default=1.0, main=True, limits=(0, 100),
                           targets=True)
    guidance_mode: str = _key("guidance", "'baked': the teacher solves with guidance and the student samples without "
                              "it; 'cfg_sync' (PeRFlow): the teacher runs at scale 1 with condition "
                              "dropout and the student is sampled with guidance", default="baked", main=True,
                              choices=("baked", "cfg_sync"), targets=True)
    cond_dropout: float = _key("guidance", "probability of replacing a sample's condition by the null condition, for "
                               "teacher and student alike (0.1 for cfg_sync)", default=0.0, below_one=True,
                               targets=True)

    @property
    def sample_guidance(self) -> float:
        """Guidance this stage's student is sampled with: 1 when baked (the targets hold it), else ``guidance``
        (cfg_sync trains the conditional and unconditional velocities for the sampler to combine)."""
        return self.guidance if self.guidance_mode == "cfg_sync" else 1.0

    @property
    def extra_stage_teacher(self) -> str:
        """The stage teacher of the ``extra_windows`` counts: ``extra_teacher``, else ``teacher``."""
        return self.extra_teacher or self.teacher

    @property
    def uses_previous(self) -> bool:
        """Whether the previous stage's student teaches any window count of this stage."""
        return "previous" in (self.teacher, self.extra_stage_teacher)

    def teacher_guidance(self, teacher: str | None = None) -> float:
        """Guidance scale of the solver of stage teacher ``teacher`` (default: the stage's ``teacher``).

        Only the original teacher in 'baked' mode is guided: a previous-stage student already has
        the guidance baked in, and 'cfg_sync' trains against the unguided teacher.
        """
        if self.guidance_mode == "baked" and (teacher or self.teacher) == "original":
            return self.guidance
        return 1.0


STAGE_KEYS = tuple(f.name for f in dataclasses.fields(Stage))


@dataclass
class Recipe:
    """A list of stages and the settings of the run (see the module doc)."""

    stages: list[Stage] = _key("run", "the stages, in order (a list of stage mappings)", main=True)
    name: str = _key("run", "name of the recipe (default output folder runs/NAME)", default="custom", main=True,
                     weights=False)
    description: str = _key("run", "one line about the recipe", default="", weights=False)
    seed: int = _key("run", "seed of data order, times, noise and condition dropout", default=0, main=True,
                     limits=(0, 2**63 - 1), targets=True)
    mixed_precision: str = _key(
        "performance", "'no', 'fp16' or 'bf16' (accelerate autocast; frozen teachers are cast); "
        "an unquoted no / off / false, which YAML reads as a boolean, means 'no'",
        default="no", main=True, choices=("no", "fp16", "bf16"), targets=True)
    from_scratch: bool = _key("student", "start stage 1 from setup.make_student() instead of the teacher's weights",
                              default=False)
    step_conditioning: bool = _key(
        "student", "give the student a learned offset per window count on its time embedding, zero at the start "
        "(proreflow.step_conditioning): one network serves every count of the stages' windows and "
        "extra_windows, sampled with the windows of the step count; for one count it folds into a stock "
        "network (proreflow export --steps N)", default=False)
    student_prediction: str = _key(
        "student", "what the student network outputs: 'teacher' (the teacher's own type, the only choice for a student "
        "copied from the teacher), or with from_scratch: true 'velocity' (the straight segment's velocity), "
        "'epsilon', 'v_prediction' or 'sample' (VP teachers), 'flow_velocity' (flow teachers); 'auto' "
        "(default): 'velocity' from scratch (measured better: docs/research/2026-quality-study.md, round 3, "
        "'Student parametrization'), else 'teacher'", default="auto", choices=("auto", "teacher") + PREDICTION_TYPES)
    checkpoint_every: int = _key("files", "write a checkpoint every N optimiser steps of a stage (0: only at "
                                 "stage ends)", default=500, limits=(0, 10**8), weights=False)
    keep_checkpoints: int = _key("files", "checkpoints kept on disk, newest first (0: keep all)", default=2,
                                 limits=(0, 10**6), weights=False)
    max_nonfinite: int = _key("monitoring", "stop the run after this many skipped non-finite steps in a stage",
                              default=10, limits=(1, 10**8), weights=False)
    optimizer: str = _key(
        "performance", "'adamw' (torch) or 'adamw_8bit' (bitsandbytes' AdamW8bit: 8-bit optimiser states, "
        "needs pip install bitsandbytes)", default="adamw", choices=OPTIMIZERS)
    allow_tf32: bool = _key(
        "performance", "TF32 matrix products and convolutions on NVIDIA GPUs (Ampere and newer: faster "
        "float32, 10-bit mantissa); nothing changes on CPU", default=False)
    gradient_checkpointing: bool = _key(
        "performance",
        "recompute activations in the backward pass instead of storing them (less memory, more compute): "
        "the student's enable_gradient_checkpointing() (diffusers models; the built-in networks have one "
        "too); teachers run without gradients, so the frozen ones keep nothing to recompute", default=False,
        weights=False)
    max_train_samples: int | None = _key("run", "train on the first N items of the setup's dataset only (all of "
                                         "them when it has fewer; null: all)", default=None, limits=(1, 10**12))
    log_every: int = _key(
        "monitoring", "log loss, learning rate and throughput every N optimiser steps (OUT/train.log, "
        "trackers; the console under --no-progress)", default=10, limits=(1, 10**8), weights=False)
    report_to: str = _key("monitoring", "trackers (accelerate's) the scalars and validation grids go to: 'none', "
                          "'tensorboard' (OUT/tensorboard/NAME), 'wandb' (needs pip install wandb) or 'all' "
                          "(both); OUT/train.log is always written", default="none", choices=REPORT_TO, weights=False)
    validation_every: int = _key(
        "monitoring", "sample the student's EMA weights every N optimiser steps of a stage and at "
        "each stage's end, with fixed conditions and fixed noise, one step per window: "
        "a grid OUT/validation/stage-<i>-<w>w/step-<global step>.png (and the samples "
        "as .safetensors), logged to the trackers (0: no validation)", default=0,
        limits=(0, 10**8), weights=False)
    validation_samples: int = _key(
        "monitoring", "validation samples per grid, for the conditions of the dataset's first N "
        "items; a setup's own validation conditions (Stable Diffusion: "
        "setup.validation_prompts) come in their own number", default=8, limits=(1, 1024),
        weights=False)
    num_workers: int = _key("performance", "DataLoader worker processes per training process", default=0,
                            limits=(0, 256), weights=False)
    target_cache: str = _key(
        "files", "folder where the original teacher's reflow batches are stored and reused by later "
        "runs with the same teacher, stage windows / solver steps / guidance, seed and batch "
        "layout (e.g. a loss or learning-rate study; stages with extra_windows make theirs "
        "online); for stages with start_points: teacher, "
        "the teacher's trajectories instead (one per dataset item, safetensors shards), solved "
        "once and read by every stage and run with the same trajectory; '' (default): none",
        default="", weights=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Recipe:
        """Check and build a recipe from its YAML form (``defaults`` merged into each stage)."""
        return _build_recipe(raw)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML form with every stage spelled out (``from_dict(to_dict())`` gives it back)."""
        data = dataclasses.asdict(self)
        data["stages"] = data.pop("stages")  # settings first, stages last
        return data

    @property
    def resolved_student_prediction(self) -> str:
        """``student_prediction`` with ``'auto'`` resolved: ``'velocity'`` from scratch, else ``'teacher'``.
        The field keeps ``'auto'``, so a recipe changed later (``dataclasses.replace(recipe, from_scratch=True)``)
        resolves by its new ``from_scratch``."""
        if self.student_prediction != "auto":
            return self.student_prediction
        return "velocity" if self.from_scratch else "teacher"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def trajectory_windows(self, index: int) -> int:
        """``K``, the fine windows through whose edges stage ``index`` (``start_points: teacher``) solves the
        teacher's trajectory: the most windows among the recipe's teacher-start stages with its solver, guidance
        and steps over t in [0, 1] (``windows * solver_steps``), which all read the same trajectory."""
        own = self.stages[index]

        def same_trajectory(stage: Stage) -> bool:
            return (stage.start_points == "teacher" and stage.solver == own.solver
                    and stage.teacher_guidance() == own.teacher_guidance()
                    and stage.windows * stage.solver_steps == own.windows * own.solver_steps)

        return max(stage.windows for stage in self.stages if same_trajectory(stage))

    @property
    def final_windows(self) -> int:
        return self.stages[-1].windows

    @property
    def step_counts(self) -> tuple[int, ...]:
        """The window counts the student is conditioned on (``step_conditioning``): every stage's windows and
        extra windows, most first; empty without step conditioning."""
        if not self.step_conditioning:
            return ()
        return tuple(sorted({k for stage in self.stages for k in (stage.windows, *stage.extra_windows)},
                            reverse=True))

    @property
    def sample_guidance(self) -> float:
        """Guidance the final student is sampled with (:attr:`Stage.sample_guidance` of the last stage)."""
        return self.stages[-1].sample_guidance


RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(Recipe)) + ("defaults",)
KEY_FIELDS = {f.name: f for f in (*dataclasses.fields(Recipe), *dataclasses.fields(Stage))}
"""Every recipe and stage key's declaration (:func:`_key`): the schema the tables below derive from."""
_CHOICES = {name: f.metadata["choices"] for name, f in KEY_FIELDS.items() if f.metadata["choices"]}
_LIMITS = {name: f.metadata["limits"] for name, f in KEY_FIELDS.items() if f.metadata["limits"]}
_BELOW_ONE = tuple(name for name, f in KEY_FIELDS.items() if f.metadata["below_one"])
TARGET_KEYS = tuple(name for name, f in KEY_FIELDS.items() if f.metadata["targets"])
"""Keys the original teacher's reflow batches depend on (the target cache's key, with the teacher, the stage index,
the process count and the dataset)."""
WEIGHTLESS_KEYS = tuple(name for name, f in KEY_FIELDS.items() if not f.metadata["weights"])
"""Recipe keys that do not change the weights a run trains (gradient checkpointing: up to rounding; a target
cache gives the uncached run's weights, wherever it lies): a resume may change them freely."""

# ---------------------------------------------------------------- reading and overrides


PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"
"""The presets, one YAML file each (``proreflow train --config NAME``), shipped in the package."""


def _presets() -> dict[str, dict[str, Any]]:
    return {path.stem: _read_yaml(path) for path in sorted(PRESET_DIR.glob("*.yaml"))}


def read_config(source: str | Path | dict, overrides: typing.Iterable[str] = ()) -> dict[str, Any]:
    """The raw YAML form of a preset name, a YAML file or a dict, with ``key=value`` overrides applied."""
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
    elif str(source) in PRESETS:
        raw = copy.deepcopy(PRESETS[str(source)])
    else:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"{source!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
        raw = _read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: a config must be a YAML mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return raw


MAX_YAML_DEPTH = 32
"""The deepest nesting of mappings and lists a config file or override value may have (a recipe needs 4)."""
MAX_KEY_PARTS = 32
"""The most dotted parts an override's key may have."""


class ConfigYAMLError(yaml.MarkedYAMLError):
    """YAML that parses but a config may not hold: a duplicate key, an alias, too deep a nesting."""


class ConfigLoader(yaml.SafeLoader):
    """The YAML loader of config files and override values: ``yaml.SafeLoader`` (no Python objects) that
    also refuses what reads one way and means another, or costs without bound:

    - a key twice in one mapping (YAML keeps the last, silently): a ConfigYAMLError naming the key;
    - aliases (``*name``, ``<<: *name``): one alias may stand for a structure built from others, many
      times over (the billion-laughs attack: memory and time in the loader and in every message that
      prints the value); a config writes its values out;
    - nesting deeper than :data:`MAX_YAML_DEPTH` (else a RecursionError).
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if event.anchor in self.anchors:  # an undefined one stays the parser's syntax error
                raise ConfigYAMLError(None, None, f"alias *{event.anchor}: a config may not use aliases (anchors "
                                      "repeated with *name); write the value out", event.start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise ConfigYAMLError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels; a config is a few "
                                      "levels of mappings and lists", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}  # key -> its line (0-based)
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise ConfigYAMLError(None, None, f"duplicate key {key!r} (also on line {seen[key] + 1}); "
                                              "a key may appear once in a mapping", key_node.start_mark)
                    seen[key] = key_node.start_mark.line
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """YAML text read by :class:`ConfigLoader` (the one reader of config files and override values)."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (a SafeLoader)


def _read_yaml(path: Path) -> Any:
    """A YAML file's content; unreadable files and syntax errors (with line and column) are RecipeErrors,
    as is what :class:`ConfigLoader` refuses (naming the file, line and key)."""
    try:
        return load_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read the file ({err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = " ".join(str(getattr(err, "problem", None) or err).split())
        kind = "" if isinstance(err, ConfigYAMLError) else "YAML syntax error: "
        raise RecipeError(f"{where}: {kind}{what}") from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override in place (``*`` selects every list element)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {item!r} is not key=value (e.g. seed=3 or stages.0.lr=1e-4)")
    parts = key.split(".")
    if len(parts) > MAX_KEY_PARTS:
        raise RecipeError(f"override {key[:60]}...: {len(parts)} dotted parts, at most {MAX_KEY_PARTS}; a config "
                          "key is a few levels deep (e.g. stages.0.lr)")
    try:
        value = load_yaml(text) if text else None
    except yaml.YAMLError as err:
        what = " ".join(str(getattr(err, "problem", None) or err).split())
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise RecipeError(f"override {key}: cannot read {shown!r} as a YAML value ({what})") from None
    _set_path(raw, parts, value, key)


def _set_path(node: Any, parts: list[str], value: Any, key: str) -> None:
    head, rest = parts[0], parts[1:]
    if isinstance(node, list):
        if head == "*":
            targets = range(len(node))
        elif head.isdigit() and int(head) < len(node):
            targets = [int(head)]
        else:
            raise RecipeError(f"override {key}: {head!r} is not an index of a list of {len(node)} "
                              f"(use 0..{len(node) - 1} or *)")
        for i in targets:
            if rest:
                _set_path(node[i], rest, value, key)
            else:
                node[i] = copy.deepcopy(value)
        return
    if not isinstance(node, dict):
        raise RecipeError(f"override {key}: {head!r} is below a value that is not a mapping or list")
    if not rest:
        node[head] = value
        return
    if head not in node or node[head] is None:
        node[head] = {}
    _set_path(node[head], rest, value, key)


def load_config(source: str | Path | dict, overrides: typing.Iterable[str] = ()
                ) -> tuple[Recipe, dict[str, Any] | None]:
    """Recipe and ``setup:`` section (None if absent) of a preset, YAML file or dict."""
    raw = read_config(source, overrides)
    setup = raw.pop("setup", None)
    if setup is not None and not isinstance(setup, dict):
        raise RecipeError(f"setup: expected a mapping such as {{name: digits}}, got {setup!r}")
    return Recipe.from_dict(raw), setup


def split_steps(total: int, weights: typing.Sequence[int]) -> list[int]:
    """``total`` optimiser steps split over stages in proportion to ``weights``: stage ``i`` gets
    ``max(1, total * w_i // sum(w))`` (equal weights give ``total // stages`` each)."""
    if total < 1 or not weights or min(weights) < 1:
        raise RecipeError(f"a budget of {total} steps cannot be split by weights {list(weights)}: the budget and "
                          "every weight must be at least 1")
    return [max(1, total * w // sum(weights)) for w in weights]


def budget_overrides(recipe: Recipe, total: int) -> list[str]:
    """Overrides that give ``recipe`` ``total`` optimiser steps in all, split over its stages in the
    proportions of its own stage steps (:func:`split_steps`); e.g. ``proreflow demo --steps``."""
    return [f"stages.{i}.steps={n}" for i, n in enumerate(split_steps(total, [s.steps for s in recipe.stages]))]


def load_recipe(source: str | Path | dict | Recipe, overrides: typing.Iterable[str] = ()) -> Recipe:
    """A checked :class:`Recipe` from a preset name, YAML file, dict or Recipe, with overrides.

    A ``setup:`` section in the file is not part of the recipe and is ignored here.
    """
    if isinstance(source, Recipe):
        source = source.to_dict()
    return load_config(source, overrides)[0]


# ---------------------------------------------------------------- checking


def _check_value(key: str, name: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the field's type and checked against :data:`_LIMITS`, or a RecipeError
    naming ``key``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list such as [2, 1], got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_value(f"{key}.{i}", name, v, item) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        return _check_range(key, name, value)
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise RecipeError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        try:
            out = float(value)
        except OverflowError:  # an integer beyond float range
            out = math.inf
        if not math.isfinite(out):
            raise RecipeError(f"{key}: must be a finite number, got {value!r}")
        if name in _BELOW_ONE and not 0 <= out < 1:
            raise RecipeError(f"{key}: must be in [0, 1), got {out}")
        if name == "snr_gamma" and out <= 0:
            raise RecipeError(f"{key}: must be > 0 (min-SNR clamps SNR at gamma; 5 is the published value), got {out}")
        if name == "c_cap" and out <= 0:
            raise RecipeError(f"{key}: must be > 0 (the largest c(t, t_end) the epsilon space divides by; e.g. 4), "
                              f"got {out}")
        return _check_range(key, name, out)
    if hint is str:
        if name == "mixed_precision" and value is False:
            return "no"  # YAML 1.1 reads no / off / false as the boolean False
        if not isinstance(value, str):
            raise RecipeError(_not_a_string(key, name, value))
        if name in _CHOICES and value not in _CHOICES[name]:
            raise RecipeError(f"{key}: {value!r} is not one of {', '.join(_CHOICES[name])}")
        if name == "name" and (not value.strip() or any(c in value for c in "/\\\0") or value in (".", "..")):
            raise RecipeError(f"{key}: {value!r} is not a folder name (it names runs/NAME): no slashes, not empty")
        return value
    raise TypeError(f"no check for {hint!r}")  # pragma: no cover - a new field type


def _check_range(key: str, name: str, value: float) -> float:
    low, high = _LIMITS.get(name, (0, math.inf))
    if not low <= value <= high:
        bound = f"at least {low}" if value < low else f"at most {high}"
        shown = f"{value:g}" if isinstance(value, float) else (str(value) if abs(value) < 10**30 else "a huge integer")
        raise RecipeError(f"{key}: must be {bound}, got {shown}")
    return value


def _not_a_string(key: str, name: str, value: Any) -> str:
    """The error for a string-valued key that YAML read as another type (``3``, ``yes``, a date)."""
    if isinstance(value, bool):
        kind, example = "a boolean (YAML 1.1 reads unquoted yes / no / on / off / true / false as booleans)", "yes"
    elif isinstance(value, (int, float)):
        kind, example = "a number", str(value)
    elif isinstance(value, datetime.date):  # datetimes too
        kind, example = "a date", str(value)
    elif value is None:
        return f"{key}: expected a {'value' if name in _CHOICES else 'string'}, got nothing (null)"
    else:
        return f"{key}: expected a string, got {value!r}"
    if name in _CHOICES:
        return f"{key}: expected one of {', '.join(_CHOICES[name])}, got {value!r}, which YAML read as {kind}"
    return (f"{key}: expected a string, got {value!r}, which YAML read as {kind}; quote the value, e.g. "
            f"{name}: '{example}' in a file or {key}=\"'{example}'\" as an override")


def _unknown(key: str, valid: typing.Iterable[str], prefix: str = "") -> RecipeError:
    hint = ""
    if not prefix and key in STAGE_KEYS:
        hint = f" ({key!r} is a stage key: use defaults.{key} or stages.*.{key})"
    return RecipeError(f"unknown key {prefix}{key!r}{hint}; valid keys: {', '.join(valid)}")


MAX_STAGES = 64
"""The most stages a recipe has (more is a typo or a generated list gone wrong, not a curriculum)."""


def _build_stage(raw: Any, defaults: dict[str, Any], where: str) -> Stage:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a stage must be a mapping such as {{windows: 4, steps: 1000}}, got {raw!r}")
    for key in raw:
        if key not in STAGE_KEYS:
            raise _unknown(key, STAGE_KEYS, f"{where}.")
    merged = {**defaults, **raw}
    if "windows" not in merged:
        raise RecipeError(f"{where}: missing key 'windows' (the number of time windows of the stage)")
    hints = typing.get_type_hints(Stage)
    values = {name: _check_value(f"{where}.{name}", name, merged[name], hints[name])
              for name in STAGE_KEYS if name in merged}
    return Stage(**values)


def _build_recipe(raw: dict[str, Any]) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe must be a mapping, got {type(raw).__name__}")
    if "tensorboard" in raw:
        raise RecipeError("tensorboard: the key is now report_to (none, tensorboard, wandb or all): write report_to: "
                          "tensorboard for tensorboard: true, and drop tensorboard: false")
    for key in raw:
        if key not in RECIPE_KEYS:
            raise _unknown(key, RECIPE_KEYS)
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise RecipeError(f"defaults: expected a mapping of stage keys, got {defaults!r}")
    for key in defaults:
        if key not in STAGE_KEYS:
            raise _unknown(key, STAGE_KEYS, "defaults.")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError("stages: a recipe needs a non-empty list of stages, e.g. [{windows: 4, steps: 1000}]")
    if len(stages_raw) > MAX_STAGES:
        raise RecipeError(f"stages: {len(stages_raw)} stages; a recipe has at most {MAX_STAGES} (halving the "
                          f"windows from {MAX_WINDOWS} to 1 takes 11)")
    stages = [_build_stage(s, defaults, f"stages.{i}") for i, s in enumerate(stages_raw)]
    hints = typing.get_type_hints(Recipe)
    values = {name: _check_value(name, name, raw[name], hints[name])
              for name in RECIPE_KEYS if name in raw and name not in ("stages", "defaults")}
    _check_schedule(stages)
    return Recipe(stages=stages, **values)


def default_solver_steps(stage: Stage, teacher: str, previous_windows: int | None = None) -> int:
    """Steps per window of ``stage`` of stage teacher ``teacher`` when ``solver_steps`` does not say: the original
    teacher ``REFERENCE_STEPS // windows`` (at least 1), the previous student one Euler step per its own window
    (``previous_windows // windows``)."""
    if teacher == "previous":
        return previous_windows // stage.windows
    return max(1, REFERENCE_STEPS // stage.windows)


def _check_schedule(stages: list[Stage]) -> None:
    """Windows keep or halve their count; teachers and solver steps fit; fills ``solver_steps``."""
    for i, stage in enumerate(stages):
        where = f"stages.{i}"
        prev = stages[i - 1] if i else None
        if prev is not None and stage.windows not in (prev.windows, prev.windows / 2):
            raise RecipeError(f"{where}.windows: {stage.windows} windows cannot follow {prev.windows}; each "
                              "stage keeps the previous count or merges neighbouring windows pairwise "
                              "(halves an even count, e.g. 8 -> 4)")
        if stage.uses_previous:
            key = "teacher" if stage.teacher == "previous" else "extra_teacher"
            if prev is None:
                raise RecipeError(f"{where}.{key}: the first stage has no previous student; use 'original'")
            if stage.guidance_mode != prev.guidance_mode:
                raise RecipeError(f"{where}.guidance_mode: {stage.guidance_mode!r} differs from the previous "
                                  f"stage's {prev.guidance_mode!r}, whose student is this stage's teacher; "
                                  "use one guidance mode for both")
        if stage.teacher == "previous":
            if stage.solver != "ddim":
                raise RecipeError(f"{where}.solver: a previous-stage teacher is piecewise straight and is "
                                  f"crossed with Euler steps, not {stage.solver!r}; use solver: ddim")
            ratio = default_solver_steps(stage, "previous", prev.windows)
            if stage.solver_steps is None:
                stage.solver_steps = ratio
            elif stage.solver_steps % ratio:
                raise RecipeError(f"{where}.solver_steps: {stage.solver_steps} Euler steps cannot cross "
                                  f"{ratio} old windows evenly; use a multiple of {ratio}")
        elif stage.solver_steps is None:
            stage.solver_steps = default_solver_steps(stage, "original")
        check_batch_split(where, stage.batch_size, stage.grad_accum)
        if stage.lr_schedule == "polynomial" and stage.lr <= POLYNOMIAL_LR_END:
            raise RecipeError(f"{where}.lr: the polynomial schedule decays to {POLYNOMIAL_LR_END:g}, so lr must be "
                              f"above it, got {stage.lr:g}; raise lr or use lr_schedule: linear")
        if stage.start_points == "teacher":
            _check_teacher_start(stage, where)
        _check_extra_windows(stage, where)
        if stage.guidance_mode == "cfg_sync" and stage.cond_dropout == 0:
            raise RecipeError(f"{where}.cond_dropout: 'cfg_sync' trains the unconditional velocity through "
                              "condition dropout; set cond_dropout > 0 (PeRFlow: 0.1)")


def _check_extra_windows(stage: Stage, where: str) -> None:
    """Extra window counts divide the stage's and are distinct; one trajectory per count is not implemented."""
    extra = stage.extra_windows
    if len(set(extra)) != len(extra) or stage.windows in extra:
        raise RecipeError(f"{where}.extra_windows: {extra} repeats a count (windows: {stage.windows} is trained "
                          "already); list each other count once")
    for k in extra:
        if stage.windows % k:
            raise RecipeError(f"{where}.extra_windows: {k} windows do not nest in the stage's {stage.windows}; use "
                              f"divisors of {stage.windows}")
    if stage.extra_teacher is not None and not extra:
        raise RecipeError(f"{where}.extra_teacher: it teaches the extra_windows counts, and this stage has none; "
                          "set extra_windows (e.g. [2, 1] with windows: 4) or leave extra_teacher out")
    if extra and stage.start_points == "teacher":
        raise RecipeError(f"{where}.extra_windows: not implemented with start_points: teacher; use start_points: "
                          "data")


def _check_teacher_start(stage: Stage, where: str) -> None:
    """What ``start_points: teacher`` needs: the original teacher, a one-step solver, no condition dropout."""
    if stage.teacher != "original":
        raise RecipeError(f"{where}.start_points: teacher start points lie on the original teacher's trajectory, "
                          "which is no target of a stage taught by the previous student; use teacher: original "
                          "or start_points: data")
    if stage.solver == "dpmpp_2m":
        raise RecipeError(f"{where}.solver: DPM-Solver++(2M) carries history across window edges, so a trajectory's "
                          "pair for a merged window is not its solve of that window; use solver: ddim or heun with "
                          "start_points: teacher")
    if stage.cond_dropout > 0 or stage.guidance_mode == "cfg_sync":
        raise RecipeError(f"{where}.cond_dropout: teacher start points follow each item's conditioned trajectory, "
                          "so condition dropout (and cfg_sync) cannot apply; set cond_dropout: 0.0 and "
                          "guidance_mode: baked, or start_points: data")


GROUPS = {"windows": "Windows and stage teacher", "targets": "Targets (the teacher's solve)",
          "guidance": "Guidance", "loss": "Loss", "optimizer": "Optimiser and batch", "run": "Run",
          "student": "Student network", "files": "Files and caches", "monitoring": "Monitoring",
          "performance": "Speed and memory"}
"""Key group -> its heading in the key reference, in the reference's order within recipe and stage keys."""


def key_reference() -> str:
    """``docs/recipe-keys.md``: every recipe and stage key by group, with its default, allowed values, whether a
    resume may change it, and its meaning; the keys most users set come first in each group."""
    out = ["# Recipe keys", "",
           "Generated from the declarations in `src/proreflow/training/recipes.py` (each key declared once); "
           "regenerate with `python -c \"from proreflow.training.recipes import key_reference; "
           "print(key_reference(), end='')\" > docs/recipe-keys.md`. **Main** keys are those most users set; "
           "the rest are advanced. *Resume* says whether `--resume` accepts a changed value without "
           "`--allow-recipe-change` (keys that do not change the trained weights); *target cache: key* marks the keys "
           "the original teacher's cached reflow batches depend on.", ""]
    for scope, fields in (("Recipe keys (top level)", dataclasses.fields(Recipe)),
                          ("Stage keys (under `defaults`, or in each element of `stages`)", dataclasses.fields(Stage))):
        out += [f"## {scope}", ""]
        for group, heading in GROUPS.items():
            members = sorted((f for f in fields if f.metadata["group"] == group), key=lambda f: not f.metadata["main"])
            if not members:
                continue
            out += [f"### {heading}", "", "| key | default | allowed | resume | target cache | meaning |",
                    "|---|---|---|---|---|---|"]
            for f in members:
                meta = f.metadata
                allowed = (" / ".join(f"`{c}`" for c in meta["choices"]) if meta["choices"] else
                           " to ".join(map(_bound, meta["limits"])) if meta["limits"] else
                           "[0, 1)" if meta["below_one"] else "")
                name = f"**`{f.name}`**" if meta["main"] else f"`{f.name}`"
                text = meta["help"].replace("|", "\\|")
                out.append(f"| {name} | `{_default(f)}` | {allowed} | {'no' if meta['weights'] else 'yes'} | "
                           f"{'key' if meta['targets'] else ''} | {text} |")
            out.append("")
    return "\n".join(out)


def _bound(value: float) -> str:
    if isinstance(value, int):
        return "2^63 - 1" if value == 2**63 - 1 else f"{value:,}"
    return f"{value:g}"


def _default(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "required" if f.default is dataclasses.MISSING else repr(f.default)


def describe_keys() -> str:
    """A table of every recipe and stage key with its default and meaning (for ``--help``)."""
    lines = ["recipe keys:"]
    for f in dataclasses.fields(Recipe):
        lines.append(_describe(f))
    lines.append(_describe_line("defaults", "{}", "stage keys shared by every stage (a stage's own keys win)"))
    lines.append("stage keys (in defaults or in each element of stages):")
    for f in dataclasses.fields(Stage):
        lines.append(_describe(f))
    return "\n".join(lines)


def _describe(f: dataclasses.Field) -> str:
    return _describe_line(f.name, _default(f), f.metadata["help"] + ("" if f.metadata["main"] else " [advanced]"))


def _describe_line(name: str, default: str, text: str) -> str:
    head = f"  {name:<23}{default:<11}"
    if len(head) > 36:  # a long default (max_train_samples' None fits) on a line of its own
        head = f"  {name:<23}{default} "
    return textwrap.fill(text, width=100, initial_indent=head, subsequent_indent=" " * 36)


PRESETS: dict[str, dict[str, Any]] = _presets()
"""Preset name -> its raw YAML form (:data:`PRESET_DIR`)."""
