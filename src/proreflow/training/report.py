"""What a run reports: progress bars, log lines (``OUT/train.log``), trackers and per-stage summaries."""

from __future__ import annotations

import json
import logging
import math
import platform
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .recipes import Stage

logger = logging.getLogger("proreflow.training")

FINAL_LOSS_STEPS = 50
"""The final loss of a stage is the mean loss of its last ``FINAL_LOSS_STEPS`` good steps."""

SKIPPED_NAMES_KEPT = 10
"""A stage's summary names its first ``SKIPPED_NAMES_KEPT`` distinct skipped data items."""


@dataclass
class StageCounters:
    """Running totals of the stage in progress (saved in checkpoints)."""

    teacher_evals: int = 0
    samples: int = 0
    skipped: int = 0
    seconds: float = 0.0
    skipped_items: int = 0
    skipped_item_names: list[str] = field(default_factory=list)

    def add(self, result) -> None:
        """Add one optimiser step (a :class:`~proreflow.training.step.StepResult`): its costs, whether it was
        skipped, and the data items the dataset skipped (each read counts; the first :data:`SKIPPED_NAMES_KEPT`
        distinct names are kept)."""
        self.teacher_evals += result.teacher_evals
        self.samples += result.samples
        self.seconds += result.seconds
        self.skipped += int(result.nonfinite)
        self.skipped_items += len(result.skipped_items)
        for name in result.skipped_items:
            if len(self.skipped_item_names) >= SKIPPED_NAMES_KEPT:
                break
            if name not in self.skipped_item_names:
                self.skipped_item_names.append(name)


@dataclass
class StageSummary:
    """What a finished stage cost and reached (also in ``OUT/summary.json``).

    teacher_evals: teacher network evaluations, one per sample per network call (a guided
        call evaluates the conditional and unconditional branch: 2).
    steps: optimiser steps attempted (``skipped`` of them had a non-finite loss or gradient).
    samples: training samples seen, over all processes.
    skipped_items: reads of data items the dataset skipped (e.g. unreadable images; an item read
        in two epochs counts twice), over all processes and loader workers; skipped_item_names:
        the first :data:`SKIPPED_NAMES_KEPT` distinct ones.
    """

    stage: int
    windows: int
    teacher: str
    steps: int
    skipped: int
    samples: int
    teacher_evals: int
    seconds: float
    final_loss: float
    skipped_items: int = 0
    skipped_item_names: list[str] = field(default_factory=list)

    def line(self, total_stages: int) -> str:
        return (f"stage {self.stage}/{total_stages} ({self.windows} windows, teacher: {self.teacher}): "
                f"{self.steps} steps in {self.seconds:.1f} s, {self.samples} samples, "
                f"{self.teacher_evals} teacher evaluations, final loss {self.final_loss:.5g}"
                + (f", {self.skipped} non-finite steps skipped" if self.skipped else "")
                + (f", {self.skipped_items} reads of damaged data skipped ({self.distinct_skipped()}: "
                   f"{', '.join(self.skipped_item_names[:3])}" + (", ...)" if len(self.skipped_item_names) > 3 else ")")
                   if self.skipped_items else ""))

    def distinct_skipped(self) -> str:
        """How many distinct items the skipped reads were: exact below :data:`SKIPPED_NAMES_KEPT` (every
        name is kept), else a lower bound ("10 or more items")."""
        n = len(self.skipped_item_names)
        return f"{n} or more items" if n >= SKIPPED_NAMES_KEPT else f"{n} item" + ("s" if n != 1 else "")

    def to_dict(self) -> dict:
        return asdict(self)


def final_loss(history: list[tuple[int, float]], first_global_step: int) -> float:
    """Mean of the last :data:`FINAL_LOSS_STEPS` losses logged from ``first_global_step`` on (nan if none)."""
    losses = [loss for step, loss in history if step >= first_global_step][-FINAL_LOSS_STEPS:]
    return sum(losses) / len(losses) if losses else math.nan


STEP_LINE = "proreflow_step_line"
"""Attribute set on the log records of the every-``log_every``-steps lines (the progress bar shows them)."""

LOG_FILE = "train.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _TqdmHandler(logging.StreamHandler):
    """Writes records with ``tqdm.write``, above the progress bars, and leaves the bars whole."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # pragma: no cover - logging's own contract
            self.handleError(record)


def _is_console(handler: logging.Handler) -> bool:
    return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and handler.stream in (sys.stdout, sys.stderr))


class Reporter:
    """What a run reports, on the main process only (nothing on the others).

    Everything goes through the ``proreflow.training`` logger: messages and stage summaries (INFO),
    warnings, and a line of loss, learning rate and throughput every ``log_every`` steps (INFO, marked
    :data:`STEP_LINE`). :meth:`open` adds ``OUT/train.log``, which receives every record of the
    ``proreflow`` loggers, and starts accelerate's trackers (``report_to``), which get the scalars and
    the validation grids. With ``progress`` there are progress bars, and while they run every record
    that reaches the root logger's console handlers (or Python's last-resort stderr), warnings of the
    ``warnings`` module included, is written above them with ``tqdm.write`` (the step lines, which the
    bar shows, are left to the file). Without ``progress`` the console gets what the application's
    logging setup sends there (``proreflow train --no-progress``: every line, on stdout).
    """

    def __init__(self, out_dir: Path, accelerator, progress: bool, log_every: int):
        self.out_dir, self.acc = Path(out_dir), accelerator
        self.enabled = accelerator.is_main_process
        self.progress, self.log_every = progress and self.enabled, log_every
        self.bar, self.file, self.trackers = None, None, False
        self._restore: list = []
        package = logging.getLogger("proreflow")
        if self.enabled and package.getEffectiveLevel() > logging.INFO:
            previous = package.level
            package.setLevel(logging.INFO)
            self._restore.append(lambda: package.setLevel(previous))
        if self.progress:
            self._redirect_console()

    def _redirect_console(self) -> None:
        root = logging.getLogger()
        original = list(root.handlers)
        console = next((h for h in original if _is_console(h)), None)
        handler = _TqdmHandler(console.stream if console is not None else sys.stderr)
        if console is not None:
            handler.setFormatter(console.formatter)
            handler.setLevel(console.level)
        handler.addFilter(lambda record: not getattr(record, STEP_LINE, False))
        root.handlers = [h for h in original if not _is_console(h)] + [handler]
        logging.captureWarnings(True)

        def restore():
            logging.captureWarnings(False)
            root.handlers = [h for h in root.handlers if h is not handler] + [h for h in original if _is_console(h)]
        self._restore.append(restore)

    def open(self, project: str, config: dict, report_to: str, header: list[str] = ()) -> None:
        """Start ``OUT/train.log`` and the trackers of ``report_to`` (``config``: the recipe, logged with them).

        ``header``: lines written to ``train.log`` only, each as ``# line``, before this launch's records
        (:func:`run_header`: the command, versions, world size, setup and resolved recipe)."""
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.file = logging.FileHandler(self.out_dir / LOG_FILE, encoding="utf-8")
        self.file.setFormatter(logging.Formatter(LOG_FORMAT))
        if header:
            self.file.stream.write("".join(f"# {line}\n" for text in header for line in text.splitlines()))
            self.file.flush()
        self.file.setLevel(logging.INFO)
        logging.getLogger("proreflow").addHandler(self.file)
        if report_to != "none":
            self.acc.init_trackers(project)
            self.trackers = True
            for tracker in self.acc.trackers:
                store_config(tracker, config)

    def say(self, message: str, warning: bool = False) -> None:
        if self.enabled:
            logger.log(logging.WARNING if warning else logging.INFO, message)

    def start_stage(self, index: int, total: int, stage: Stage, start_step: int) -> None:
        self.where = f"stage {index + 1}/{total} ({stage.windows}w)"
        self.stage_steps = stage.steps
        if self.progress:
            self.bar = tqdm(total=stage.steps, initial=start_step, dynamic_ncols=True, desc=self.where, unit="step")

    def step(self, global_step: int, step: int, loss: float, scalars: dict[str, float],
             samples_per_second: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if step % self.log_every == 0 or step == 1:
                self.bar.set_postfix(loss=f"{loss:.4g}", samples_s=f"{samples_per_second:.1f}", refresh=False)
        if step % self.log_every == 0:
            values = " ".join(f"{name} {value:.4g}" for name, value in scalars.items())
            logger.info(f"{self.where} step {step}/{self.stage_steps} (global {global_step}): loss {loss:.5g} "
                        f"{values} samples/s {samples_per_second:.1f}", extra={STEP_LINE: True})
            if self.trackers:
                self.acc.log({"train/loss": loss, "train/samples_per_second": samples_per_second,
                              **{f"train/{name}": value for name, value in scalars.items()}}, step=global_step)

    def images(self, name: str, grid, step: int) -> None:
        """Log an image (``H x W x 3`` uint8 array) to every tracker."""
        if not (self.enabled and self.trackers):
            return
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({name: grid[None]}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({name: [grid]}, step=step)

    def end_stage(self, summary: StageSummary, total: int) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.trackers:
            self.acc.log({"stage/final_loss": summary.final_loss, "stage/teacher_evals": summary.teacher_evals},
                         step=summary.stage)
        self.say(summary.line(total))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.trackers:
            self.acc.end_training()
            self.trackers = False
        if self.file is not None:
            logging.getLogger("proreflow").removeHandler(self.file)
            self.file.close()
            self.file = None
        while self._restore:
            self._restore.pop()()


def run_header(command: list[str], world_size: int, device: str, setup: dict, recipe_yaml: str) -> list[str]:
    """The lines that open each launch's part of ``train.log``: what was run, with which package versions,
    on how many processes, on what setup (its identity, :func:`~proreflow.training.setup.setup_identity`),
    with which resolved recipe."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    packages = ("proreflow", "torch", "diffusers", "transformers", "accelerate", "peft", "safetensors")
    return [f"command: {shlex.join(command)}",
            f"versions: python {platform.python_version()}, " + ", ".join(f"{n} {installed(n)}" for n in packages),
            f"world size {world_size} (processes), device {device}",
            f"setup: {json.dumps(setup, sort_keys=True)}",
            "resolved recipe:", recipe_yaml]


def store_config(tracker, config: dict) -> None:
    """Record the recipe with ``tracker``. TensorBoard gets it as a text entry of the run itself: accelerate's
    ``store_init_configuration`` writes it through ``add_hparams``, which opens a second, otherwise empty run
    folder at every launch; other trackers take it as their run configuration."""
    if tracker.name == "tensorboard":
        import yaml

        tracker.writer.add_text("recipe", "    " + yaml.safe_dump(config, sort_keys=False).replace("\n", "\n    "))
        tracker.writer.flush()
    else:
        tracker.store_init_configuration(flat_config(config))


def flat_config(config: dict, prefix: str = "") -> dict:
    """A nested recipe as one level of ``a.b.0.c`` keys with tracker-friendly values (None as 'null')."""
    flat = {}
    items = config.items() if isinstance(config, dict) else enumerate(config)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list, tuple)):
            flat.update(flat_config(value, f"{name}."))
        else:
            flat[name] = "null" if value is None else value
    return flat
