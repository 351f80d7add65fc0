"""The progressive loop (:func:`train`): stages in order, checkpoints, resume, the result.

Stage 1's student starts from the teacher's weights (or ``setup.make_student()`` with
``from_scratch``); each later stage starts from the previous stage's EMA weights, with a fresh
optimiser and EMA. Devices, processes and mixed precision come from ``accelerate``: the same
call runs on CPU, one GPU or many (``accelerate launch`` / ``torchrun``), with a full student per
GPU (DDP) or sharded by accelerate's FSDP2 plugin (files are full tensors either way:
:mod:`.sharding`, docs/multi-gpu.md), where the global batch of a step, its randomness and hence
the result do not depend on the process count.
The optimiser steps of each stage are those of :class:`~proreflow.training.stage_runner.StageRunner`;
this module adds what a run keeps on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import LOCK_FILE, TEMPORARY, atomic_write_text, folder_lock, remove_temporaries, write_json
from ..signals import Stopped, exit_code, handled
from ..teachers import Denoiser
from ..windows import TimeWindows
from .checkpoint import (
    CHECKPOINTS,
    STUDENT_FORMAT,
    Checkpoint,
    Layout,
    discard_newer_checkpoints,
    latest_checkpoint,
    load_weights,
    named_checkpoint,
    open_checkpoint,
    recorded_recipe,
    resume_checkpoint,
    set_rng_state,
    stage_dir,
    write_checkpoint,
    write_stage_result,
)
from .ema import EMA
from .environment import check_environment, fsdp_left_unused, make_accelerator, set_tf32
from .recipes import WEIGHTLESS_KEYS, Recipe, load_recipe
from .report import LOG_FILE, Reporter, StageCounters, StageSummary, final_loss, run_header
from .setup import DistillationSetup, setup_identity
from .sharding import full_optimizer_state, full_tensors, is_sharded, reshard, sharded_optimizer_state
from .stage_runner import StageRunner, Trainee, limit_dataset, unsharded_student
from .step import NonFiniteLossError, check_setup_fits
from .streams import check_dataset
from .validation import Validation, ema_weights, grid_image, validation_samples, write_validation

CHECKPOINT_FORMAT = 1


@dataclass
class TrainResult:
    """A finished run.

    student: the final EMA student (sample it with ``windows`` and ``guidance``).
    module: the student's network (EMA weights, eval mode), e.g. for export. With
        ``setup.teacher_view`` under mixed precision its frozen parameters are in the mixed-precision
        dtype, and ``student`` feeds it inputs in that dtype (export loads the run's files onto the
        float32 teacher instead).
    history: ``(global_step, loss)`` of every optimiser step that was not skipped.
    """

    student: Denoiser
    module: nn.Module
    windows: TimeWindows
    guidance: float
    stages: list[StageSummary]
    history: list[tuple[int, float]]
    out_dir: Path


@dataclass
class RunState:
    """Where a run stands: stage (0-based), optimiser steps done in it, and what came before."""

    stage: int = 0
    step: int = 0
    global_step: int = 0
    counters: StageCounters = field(default_factory=StageCounters)
    completed: list[StageSummary] = field(default_factory=list)
    history: list[tuple[int, float]] = field(default_factory=list)

    def meta(self, recipe: Recipe, num_processes: int, setup: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's ``meta.json``; ``setup``: the run's :func:`~.setup.setup_identity`."""
        return {"format": CHECKPOINT_FORMAT, "recipe": recipe.to_dict(), "stage": self.stage, "step": self.step,
                "global_step": self.global_step, "counters": dataclasses.asdict(self.counters),
                "completed": [s.to_dict() for s in self.completed], "num_processes": num_processes, "setup": setup}

    @classmethod
    def from_checkpoint(cls, meta: dict[str, Any], state: dict[str, Any]) -> RunState:
        history = [(int(s), float(v)) for s, v in state["history"].tolist()]
        return cls(meta["stage"], meta["step"], meta["global_step"], StageCounters(**meta["counters"]),
                   [StageSummary(**s) for s in meta["completed"]], history)


def train(recipe: Recipe | str | Path | dict, setup: DistillationSetup, out_dir: str | Path,
          resume: bool | str = False, progress: bool = True, allow_recipe_change: bool = False) -> TrainResult:
    """Run every stage of ``recipe`` on ``setup`` and write the results under ``out_dir``.

    resume: True (or 'latest'): continue from ``out_dir``'s newest complete checkpoint (a fresh start
        when there is none; damaged ones are reported and passed over); a checkpoint's name
        (``step-00000500``), global step (``'500'``) or folder: continue from that one, deleting the
        checkpoints after it (the continuation this run replaces). Without it an ``out_dir`` that
        already holds checkpoints is an error; so is a resume with other values of keys that change
        the weights (lr, seed, ...) or another setup (family, setup keys, teacher, data: the
        checkpoints record :func:`~.setup.setup_identity`) unless ``allow_recipe_change``
        (:func:`check_output_folder`). A finished run resumed trains nothing: it logs that it is
        finished (:func:`finished_line`) and returns its result.
    progress: progress bars on the main process, with messages and warnings written above them
        (:class:`~proreflow.training.report.Reporter`); every run also logs to ``OUT/train.log``.

    The teacher network is put in eval mode and moved to the device (cast to the
    mixed-precision dtype) in place; it never gets gradients (with ``setup.teacher_view`` its
    frozen parameters are cast, the student's trainable ones stay float32). Raises
    :class:`NonFiniteLossError` after ``max_nonfinite`` skipped steps in a stage, leaving the
    last good checkpoint as it was. Ctrl-C, SIGTERM or SIGHUP stops between two optimiser steps, writes
    a checkpoint and raises :class:`TrainingInterrupted` (a second one ends the process at once).
    """
    recipe = load_recipe(recipe)
    out = Path(out_dir)
    check_environment(recipe)
    set_tf32(recipe.allow_tf32)
    acc = make_accelerator(recipe.mixed_precision, recipe.report_to, out)
    reporter = Reporter(out, acc, progress, recipe.log_every)
    try:  # one writer per output folder (the main process writes)
        with folder_lock(out) if acc.is_main_process else contextlib.nullcontext(), _StopRequest() as stop:
            return _Run(recipe, setup, out, acc, reporter, stop).run(resume, allow_recipe_change)
    finally:
        reporter.close()


class TrainingInterrupted(Stopped):
    """A stop signal (:data:`~proreflow.signals.STOP_SIGNALS`) stopped :func:`train` between two optimiser
    steps; ``checkpoint`` is the newest checkpoint (written at the stop when the stage had made progress), or
    None; ``signum`` the signal."""

    def __init__(self, message: str, checkpoint: Path | None, signum: int = signal.SIGINT):
        super().__init__(message, signum)
        self.checkpoint = checkpoint


class _StopRequest:
    """While active (main thread only), the first stop signal (:func:`~proreflow.signals.handled`) sets :attr:`signum`
    (and :attr:`requested`) instead of stopping the process; a second one ends the process at once with one
    line on stderr and exit code 128 + its number (``os._exit``: no traceback; the files being written are
    temporaries, never read, removed at the next start in the folder)."""

    def __init__(self):
        self.signum, self._previous = None, {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in handled()}
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        name = signal.Signals(signum).name
        os.write(2, f"proreflow: {name} again: stopped at once without a checkpoint; the newest complete "
                    f"checkpoint is kept (continue with --resume)\n".encode())
        os._exit(exit_code(signum))

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


RUN_ENTRIES = {LOCK_FILE, CHECKPOINTS, "recipe.yaml", LOG_FILE, "summary.json", "student.json", "student.safetensors",
               "validation", "tensorboard", "wandb"}
"""The names a run writes in its output folder, besides its stage folders (``stage-<i>-<w>w``) and temporaries."""


def foreign_entries(out_dir: str | Path, allowed: tuple[str | Path, ...] = ()) -> list[str]:
    """The entries of ``out_dir`` that no run wrote (:data:`RUN_ENTRIES`), sorted; ``allowed``: paths a run was
    told to use that may lie inside it (a target or latent cache)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    inside = {Path(a).expanduser().resolve() for a in allowed if a}
    return sorted(p.name for p in out.iterdir()
                  if p.name not in RUN_ENTRIES and not re.fullmatch(r"stage-\d+-\d+w", p.name)
                  and not TEMPORARY.fullmatch(p.name) and p.resolve() not in inside)


def check_output_folder(recipe: Recipe, out_dir: str | Path, resume: bool | str, allow_recipe_change: bool = False,
                        rank: int = 0, warn=None, layout: Layout | None = None,
                        identity: dict[str, Any] | None = None) -> Checkpoint | None:
    """What :func:`train` checks of ``out_dir`` before it trains: the checkpoint it would resume from
    (``resume`` as in :func:`train`), its contents checked (``layout``: the run's student, to check the
    tensors against; :func:`~proreflow.training.checkpoint.resume_checkpoint`).

    Errors: checkpoints there without ``resume`` (FileExistsError); only damaged ones, or a named one
    that is damaged (:class:`~proreflow.training.checkpoint.DamagedCheckpointError`) or absent
    (:class:`~proreflow.training.checkpoint.CheckpointError`); a checkpoint of other stages, or one
    trained with other values of keys that change the weights (lr, seed, ...) or another setup (``identity``,
    :func:`~.setup.setup_identity`: :func:`check_setup`) unless ``allow_recipe_change`` (ValueError).
    ``warn(line)`` hears of damaged checkpoints passed over and of changes allowed.
    """
    out = Path(out_dir)
    latest = latest_checkpoint(out)
    if not resume and latest is not None:
        raise FileExistsError(f"{out} already holds checkpoints (latest: {latest.name}); resume with --resume "
                              "(resume=True) or choose another output folder")
    if isinstance(resume, str) and resume != "latest":
        found = open_checkpoint(named_checkpoint(out, resume), out, rank, layout)
    else:
        found = resume_checkpoint(out, rank, warn, layout)
    if found is not None:
        changed = check_resume(recipe, found.meta, found.path, allow_recipe_change)
        changed_setup = check_setup(found.meta.get("setup"), identity, found.path, allow_recipe_change)
        if changed and warn is not None:
            warn(f"resuming with a changed recipe: {', '.join(changed)}")
        if changed_setup and warn is not None:
            warn(f"resuming with a changed setup: {', '.join(changed_setup)}")
    return found


def check_setup(recorded: dict[str, Any] | None, identity: dict[str, Any] | None, checkpoint: Path,
                allow_change: bool = False) -> list[str]:
    """The setup keys whose values differ between the checkpoint's recorded :func:`~.setup.setup_identity`
    and this run's ``identity`` (``setup.KEY`` of the setup section, ``setup info KEY`` of a fingerprint);
    raises ValueError naming the first when any differ and ``allow_change`` is False.

    A setup key one section leaves out and the other gives its builder's default (``section_defaults``) is no
    change. What either side does not know is accepted: a checkpoint written before setups were recorded (no
    ``recorded``), a setup section or fingerprint one side lacks (a setup built in code has no section; the
    command line checks the section before the setup is built, :func:`train` the fingerprints after).
    """
    if not isinstance(recorded, dict) or identity is None:
        return []
    changed = []
    if isinstance(recorded.get("section"), dict) and identity.get("section") is not None:
        defaults = identity.get("section_defaults") or {}

        def meaning(section: dict[str, Any]) -> dict[str, Any]:  # a key at its default says what leaving it out does
            return {key: value for key, value in section.items() if key not in defaults or defaults[key] != value}

        changed += [f"setup.{key}" for key in _changed_keys(meaning(recorded["section"]), meaning(identity["section"]))]
    changed += [f"setup info {key}" for key in identity if key not in ("section", "section_defaults")
                and key in recorded and recorded[key] != identity[key]]
    if changed and not allow_change:
        first = changed[0]
        raise ValueError(f"{first}: the checkpoint {checkpoint.name} was trained with {_setup_value(recorded, first)!r}"
                         f", the setup now gives {_setup_value(identity, first)!r}"
                         + (f" (changed too: {', '.join(changed[1:])})" if len(changed) > 1 else "")
                         + "; resume with the setup of the run, or pass --allow-recipe-change "
                         "(allow_recipe_change=True) to go on with this one")
    return changed


def _setup_value(identity: dict[str, Any], name: str) -> Any:
    """The value :func:`check_setup`'s ``name`` (``setup.a.b`` or ``setup info KEY``) has in ``identity``."""
    if name.startswith("setup info "):
        return identity.get(name.removeprefix("setup info "))
    node: Any = identity.get("section")
    for part in name.removeprefix("setup.").split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def is_finished(recipe: Recipe, meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's run has done every stage of ``recipe`` (its last checkpoint, at the run's end)."""
    return meta["stage"] >= len(recipe.stages) and meta["step"] == 0


def finished_line(recipe: Recipe, out_dir: str | Path) -> str:
    """What a resume of a finished run says (it trains nothing)."""
    out = Path(out_dir)
    windows, guidance = recipe.final_windows, recipe.sample_guidance
    return (f"run in {out} is finished: student at {out / 'student.safetensors'} ({windows} windows: sample with "
            f"{windows} steps" + (f", guidance {guidance:g}" if guidance != 1.0 else "") + "); nothing to train "
            "(a new run needs another --out)")


def result_line(completed: list[StageSummary], out_dir: str | Path) -> str:
    """The last line of a run's ``train.log``: its totals over every stage and where the student is."""
    steps, evals = sum(s.steps for s in completed), sum(s.teacher_evals for s in completed)
    seconds = sum(s.seconds for s in completed)
    windows = completed[-1].windows if completed else 0
    return (f"result: {len(completed)} stage(s), {steps} optimiser steps, {evals} teacher evaluations, "
            f"{seconds:.1f} s of training; student ({windows} windows) at {Path(out_dir) / 'student.safetensors'}")


def check_resume(recipe: Recipe, meta: dict[str, Any], checkpoint: Path, allow_change: bool = False) -> list[str]:
    """The keys whose values differ between ``recipe`` and the checkpoint's; raises ValueError when the
    checkpoint's finished and current stages are not this recipe's, or when a key that changes the
    weights differs and ``allow_change`` is False."""
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{checkpoint} has checkpoint format {meta.get('format')}, this version reads "
                         f"{CHECKPOINT_FORMAT}")
    old = recorded_recipe(meta)
    last = meta["stage"] if meta["step"] > 0 else meta["stage"] - 1
    if last >= len(recipe.stages):
        raise ValueError(f"{checkpoint} is past stage {last + 1}, but the recipe has {len(recipe.stages)} "
                         "stages; resume with the recipe of that run")
    for i in range(last + 1):
        for key in ("windows", "teacher"):
            if getattr(old.stages[i], key) != getattr(recipe.stages[i], key):
                raise ValueError(f"stages.{i}.{key}: the checkpoint {checkpoint} was trained with "
                                 f"{getattr(old.stages[i], key)!r}, the recipe says "
                                 f"{getattr(recipe.stages[i], key)!r}; resume with the same stages")
    # what trained is compared: 'auto' as resolved (older checkpoints recorded it resolved)
    changed = _changed_keys({**old.to_dict(), "student_prediction": old.resolved_student_prediction},
                            {**recipe.to_dict(), "student_prediction": recipe.resolved_student_prediction})
    replayed = [key for key in changed if key not in WEIGHTLESS_KEYS]
    if replayed and not allow_change:
        first = replayed[0]
        raise ValueError(f"{first}: the checkpoint {checkpoint.name} was trained with {_value(old, first)!r}, the "
                         f"recipe now says {_value(recipe, first)!r}" + (f" (changed too: {', '.join(replayed[1:])})"
                                                                         if len(replayed) > 1 else "")
                         + "; resume with the recipe of the run, or pass --allow-recipe-change "
                         "(allow_recipe_change=True) to go on with the new values")
    return changed


def _value(recipe: Recipe, dotted: str) -> Any:
    node: Any = recipe.to_dict()
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node.get(part) if isinstance(node, dict) else None
    return node


class _Run:
    """The state of one :func:`train` call (module doc)."""

    def __init__(self, recipe: Recipe, setup: DistillationSetup, out: Path, acc, reporter: Reporter,
                 stop: _StopRequest):
        self.recipe, self.setup, self.out, self.acc, self.reporter = recipe, setup, out, acc, reporter
        self.stop = stop

    @property
    def student_type(self) -> str:
        """The student's output type (recipe ``student_prediction``)."""
        return self.setup.student_prediction_type(self.recipe.resolved_student_prediction, self.recipe.from_scratch)

    # ------------------------------------------------------------ setup and resume

    def run(self, resume: bool | str, allow_recipe_change: bool) -> TrainResult:
        recipe, acc = self.recipe, self.acc
        check_dataset(self.setup.dataset)
        check_setup_fits(recipe, self.setup, acc.num_processes)
        network = Trainee.network(self.setup, recipe)  # its layout checks the checkpoints' tensors
        self.identity = setup_identity(self.setup.section, self.setup.info, self.setup.section_defaults)
        found = check_output_folder(recipe, self.out, resume, allow_recipe_change, acc.process_index,
                                    lambda line: self.reporter.say(line, warning=True),
                                    Layout.of(network, Trainee.is_shared(self.setup, recipe)), self.identity)
        self.reporter.open(recipe.name, recipe.to_dict(), recipe.report_to,
                           run_header(sys.argv, acc.num_processes, acc.device.type, self.identity, recipe.to_yaml()))
        self.reporter.say(f"run {recipe.name} in {self.out}: world size {acc.num_processes} (processes), "
                          f"device {acc.device.type}, mixed precision {recipe.mixed_precision}")
        self._remove_temporaries()
        self.tag = self._main_pid()
        if fsdp_left_unused(acc):
            self.reporter.say(f"ACCELERATE_USE_FSDP is set, but accelerate shards only over several GPUs: this run "
                              f"({acc.num_processes} process(es) on {acc.device.type}) keeps a full student on each "
                              "process (docs/multi-gpu.md)", warning=True)
        self.validation = (Validation.for_run(recipe, limit_dataset(self.setup, recipe.max_train_samples))
                           if recipe.validation_every else None)
        if found is not None and isinstance(resume, str) and resume != "latest":
            if acc.is_main_process:
                dropped = discard_newer_checkpoints(self.out, found.path)
                if dropped:
                    self.reporter.say(f"resuming from {found.path.name}: deleted the later checkpoints "
                                      f"{', '.join(dropped)}", warning=True)
            acc.wait_for_everyone()
        checkpoint = found.path if found is not None else None
        state, saved = RunState(), None
        if found is not None:
            saved = found.state
            state = RunState.from_checkpoint(found.meta, saved)
            if found.rng is not None:
                set_rng_state(found.rng)
            self.reporter.say(finished_line(recipe, self.out) if is_finished(recipe, found.meta) else
                              f"resuming from {checkpoint} (stage {state.stage + 1}, step {state.step})")
        elif resume:
            self.reporter.say(f"no checkpoint in {self.out}: starting from the beginning")
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "recipe.yaml", recipe.to_yaml())

        weights = []  # the student's starting weights: stage 1's are the teacher's (or make_student's)
        if state.stage > 0:
            weights.append(self._stage_weights(state.stage - 1))
        if state.step > 0:
            weights.append(load_weights(checkpoint / "student.safetensors"))
        self.trainee = Trainee.prepare(self.setup, recipe, acc, weights, network)
        self.module = self.trainee.module
        if saved is not None and saved.get("scaler") is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(saved["scaler"])

        for index in range(state.stage, len(recipe.stages)):
            resumed = checkpoint if state.step > 0 else None
            self._run_stage(index, state, resumed, saved if resumed else None)
        acc.wait_for_everyone()
        self.reporter.say(result_line(state.completed, self.out))
        module = acc.unwrap_model(self.trainee.student, keep_fp32_wrapper=False).eval()
        if is_sharded(module):  # the result is a plain network with the full weights, on every process
            module = unsharded_student(self.setup, recipe, full_tensors(module.state_dict())).to(acc.device).eval()
        dtype = self.trainee.weight_dtype if self.trainee.shared else None  # its base is in it (Trainee.shared)
        return TrainResult(self.setup.denoiser(module, dtype=dtype, prediction_type=self.student_type), module,
                           TimeWindows(recipe.final_windows),
                           recipe.sample_guidance, state.completed, state.history, self.out)

    def _remove_temporaries(self) -> None:
        """Remove the temporary files a killed run left in the output folder (main process, holding its
        lock: no other process writes there), with a log line naming them."""
        if self.acc.is_main_process and self.out.is_dir():
            removed = remove_temporaries(self.out)
            if removed:
                shown = ", ".join(removed[:5]) + (f" and {len(removed) - 5} more" if len(removed) > 5 else "")
                self.reporter.say(f"removed {len(removed)} temporary file(s) an interrupted run left in {self.out}: "
                                  f"{shown}")
        self.acc.wait_for_everyone()

    def _main_pid(self) -> int:
        """The main process's id, the same on every process: it names the temporary checkpoint folders."""
        pid = torch.tensor([os.getpid() if self.acc.is_main_process else 0], dtype=torch.int64)
        if self.acc.num_processes > 1:
            pid = self.acc.reduce(pid.to(self.acc.device), "sum").cpu()
        return int(pid.item())

    def _stage_weights(self, index: int) -> dict[str, torch.Tensor]:
        path = stage_dir(self.out, index, self.recipe.stages[index].windows) / "ema.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the result of stage {index + 1} is needed to go on")
        return load_weights(path)

    # ------------------------------------------------------------ one stage

    def _run_stage(self, index: int, state: RunState, checkpoint: Path | None, saved: dict | None) -> None:
        recipe, stage = self.recipe, self.recipe.stages[index]
        previous = self._stage_weights(index - 1) if stage.uses_previous else None
        runner = StageRunner(recipe, self.setup, index, trainee=self.trainee, previous=previous,
                             start_step=state.step, counters=state.counters)
        if checkpoint is not None:
            runner.ema.load_state_dict(load_weights(checkpoint / "ema.safetensors"))
            optimizer = self.trainee.optimizer
            optimizer.load_state_dict(sharded_optimizer_state(saved["optimizer"], optimizer))
        first_global = state.global_step - state.step + 1
        self.reporter.start_stage(index, len(recipe.stages), stage, state.step)
        with runner:
            while runner.step_index < stage.steps:
                if self._stop_requested():
                    self._interrupt(index, state, runner)
                result = runner.step()
                state.step, state.global_step = runner.step_index, state.global_step + 1
                if result.nonfinite:
                    self._nonfinite(index, state)
                else:
                    state.history.append((state.global_step, result.loss))
                self.reporter.step(state.global_step, state.step, result.loss, result.scalars,
                                   result.samples / result.seconds)
                if recipe.validation_every and state.step % recipe.validation_every == 0 and state.step < stage.steps:
                    self._validate(index, state.global_step, runner.ema)  # before the checkpoint that follows it
                if recipe.checkpoint_every and state.step % recipe.checkpoint_every == 0 and state.step < stage.steps:
                    self._checkpoint(state, self._mid_stage_weights(runner.ema))
        self._finish_stage(index, state, runner.ema, first_global)

    def _mid_stage_weights(self, ema: EMA) -> dict[str, dict[str, torch.Tensor]]:
        """A mid-stage checkpoint's weights: the student's (:meth:`Trainee.saved`) and the EMA's averaged
        (trainable) tensors only: the frozen ones are the student's; full tensors on the main process (every
        process calls it: FSDP2 gathers)."""
        main = self.acc.is_main_process
        return {"student": full_tensors(self.trainee.saved(self.module.state_dict()), main),
                "ema": full_tensors(ema.tensors(), main)}

    def _stop_requested(self) -> bool:
        """Whether a stop signal reached any process (all of them stop at the same step)."""
        flag = torch.tensor([float(self.stop.requested)])
        if self.acc.num_processes > 1:
            flag = self.acc.reduce(flag.to(self.acc.device), "sum").cpu()
        return bool(flag.item() > 0)

    def _interrupt(self, index: int, state: RunState, runner: StageRunner) -> None:
        """Write a checkpoint of the steps done (if the stage made any) and raise TrainingInterrupted."""
        if state.step > 0:
            self._checkpoint(state, self._mid_stage_weights(runner.ema))
        newest = latest_checkpoint(self.out)
        signum = self.stop.signum or signal.SIGINT  # a process that got none stops with the others
        by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
        where = f"stage {index + 1}, step {state.step}"
        raise TrainingInterrupted(f"interrupted{by} at {where}; " + (f"newest checkpoint: {newest}" if newest else
                                                                     "no checkpoint yet (nothing was trained)"),
                                  newest, signum)

    def _nonfinite(self, index: int, state: RunState) -> None:
        skipped, limit = state.counters.skipped, self.recipe.max_nonfinite
        self.reporter.say(f"stage {index + 1}, step {state.step}: non-finite loss or gradient, step skipped "
                          f"({skipped} of at most {limit})", warning=True)
        if skipped >= limit:
            raise NonFiniteLossError(
                f"stage {index + 1}, step {state.step}: {skipped} optimiser steps had a non-finite loss or "
                f"gradient (max_nonfinite={limit}); the run stopped. {self._last_good()}")

    def _last_good(self) -> str:
        last = latest_checkpoint(self.out)
        return (f"Last good checkpoint: {last if last is not None else 'none (none was written yet)'}. Lower the "
                "learning rate or check the data and the teacher, then continue with --resume.")

    def _finish_stage(self, index: int, state: RunState, ema: EMA, first_global: int) -> None:
        recipe, stage, acc = self.recipe, self.recipe.stages[index], self.acc
        if state.counters.skipped >= state.step:
            raise NonFiniteLossError(f"stage {index + 1}: all {state.step} optimiser steps were skipped (non-finite "
                                     f"loss or gradient); the stage has no result. {self._last_good()}")
        summary = StageSummary(stage=index + 1, windows=stage.windows, teacher=stage.teacher, steps=state.step,
                               skipped=state.counters.skipped, samples=state.counters.samples,
                               teacher_evals=state.counters.teacher_evals, seconds=state.counters.seconds,
                               final_loss=final_loss(state.history, first_global),
                               skipped_items=state.counters.skipped_items,
                               skipped_item_names=list(state.counters.skipped_item_names))
        weights = full_tensors(self.trainee.saved(ema.state_dict(self.module)), acc.is_main_process)  # FSDP2 gathers
        if acc.is_main_process:
            write_stage_result(self.out, index, weights, self._student_info(index, state))
        acc.wait_for_everyone()
        ema.copy_to(self.module)  # the next stage starts from this stage's EMA weights
        if recipe.validation_every:
            self._validate(index, state.global_step, None)
        state.completed.append(summary)
        state.stage, state.step, state.counters = index + 1, 0, StageCounters()
        if acc.is_main_process:
            write_json(self.out / "summary.json", [s.to_dict() for s in state.completed])
        self._checkpoint(state, {})
        self.reporter.end_stage(summary, len(recipe.stages))

    def _validate(self, index: int, global_step: int, ema: EMA | None) -> None:
        """Validation samples and grid of the student (its EMA weights, or its weights when ``ema`` is None)."""
        acc, stage = self.acc, self.recipe.stages[index]
        sharded = is_sharded(self.module)
        if acc.is_main_process or sharded:  # a sharded student's forward needs every process
            with ema_weights(self.module, ema) if ema is not None else contextlib.nullcontext():
                samples = validation_samples(self.setup, self.module, self.validation, stage.windows,
                                             stage.sample_guidance,
                                             self.trainee.uncond, acc.device, acc.autocast, self.student_type)
            if sharded:
                reshard(self.module)
        if acc.is_main_process:
            grid = grid_image(samples, self.validation.labels, self.setup.decode)
            folder = self.out / "validation" / stage_dir(self.out, index, stage.windows).name
            path = write_validation(folder, global_step, samples, grid)
            if grid is not None:
                self.reporter.images(f"validation/stage-{index + 1}-{stage.windows}w", grid, global_step)
            self.reporter.say(f"validation samples of step {global_step}: {path or folder}")
        acc.wait_for_everyone()

    def _student_info(self, index: int, state: RunState) -> dict[str, Any]:
        """``student.json``: what sampling code needs to rebuild and sample the student."""
        stage = self.recipe.stages[index]
        return {"format": STUDENT_FORMAT, "windows": stage.windows, "prediction_type": self.student_type,
                "guidance_mode": stage.guidance_mode,
                "guidance": stage.sample_guidance,
                "from_scratch": self.recipe.from_scratch, "step_counts": list(self.recipe.step_counts),
                "served_windows": [stage.windows, *stage.extra_windows] if self.recipe.step_counts else [stage.windows],
                "recipe": self.recipe.name, "stage": index + 1,
                "stages": len(self.recipe.stages), "global_step": state.global_step, "info": self.setup.info}

    def _checkpoint(self, state: RunState, weights: dict[str, dict[str, torch.Tensor]]) -> Path:
        scaler = self.acc.scaler.state_dict() if self.acc.scaler is not None else None
        optimizer = (full_optimizer_state(self.trainee.optimizer.state_dict(), self.acc.is_main_process)
                     if weights else None)
        saved = {"optimizer": optimizer, "scaler": scaler,
                 "history": torch.tensor(state.history, dtype=torch.float64).reshape(-1, 2)}
        meta = state.meta(self.recipe, self.acc.num_processes, self.identity)
        return write_checkpoint(self.acc, self.out, state.global_step, meta, saved, weights,
                                self.recipe.keep_checkpoints, self.tag)


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new))
                for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [k for i, (a, b) in enumerate(zip(old, new)) for k in _changed_keys(a, b, f"{prefix}{i}.")]
    return [] if old == new else [prefix.rstrip(".")]
