"""What a run reports: progress bars, TensorBoard scalars and per-stage summaries."""

from __future__ import annotations

import logging
import math
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

    def add_skipped_items(self, names: list[str]) -> None:
        """Count data items the dataset skipped (each read of one counts) and keep the first
        :data:`SKIPPED_NAMES_KEPT` distinct names."""
        self.skipped_items += len(names)
        for name in names:
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
                + (f", {self.skipped_items} data items skipped (first: {', '.join(self.skipped_item_names[:3])}"
                   + (", ...)" if len(self.skipped_item_names) > 3 else ")") if self.skipped_items else ""))

    def to_dict(self) -> dict:
        return asdict(self)


def final_loss(history: list[tuple[int, float]], first_global_step: int) -> float:
    """Mean of the last :data:`FINAL_LOSS_STEPS` losses logged from ``first_global_step`` on (nan if none)."""
    losses = [loss for step, loss in history if step >= first_global_step][-FINAL_LOSS_STEPS:]
    return sum(losses) / len(losses) if losses else math.nan


class Reporter:
    """Progress bar, log lines and TensorBoard scalars, on the main process only."""

    def __init__(self, out_dir: Path, enabled: bool, progress: bool, tensorboard: bool, log_every: int):
        self.enabled, self.progress, self.log_every = enabled, progress and enabled, log_every
        self.bar = None
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("tensorboard=true needs the tensorboard package: pip install tensorboard") from err
            self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def say(self, message: str, warning: bool = False) -> None:
        if not self.enabled:
            return
        logger.log(logging.WARNING if warning else logging.INFO, message)
        if self.progress:
            tqdm.write(message)

    def start_stage(self, index: int, total: int, stage: Stage, start_step: int) -> None:
        if self.progress:
            self.bar = tqdm(total=stage.steps, initial=start_step, dynamic_ncols=True,
                            desc=f"stage {index + 1}/{total} ({stage.windows}w)", unit="step")

    def step(self, global_step: int, step: int, loss: float, scalars: dict[str, float],
             samples_per_second: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if step % self.log_every == 0 or step == 1:
                self.bar.set_postfix(loss=f"{loss:.4g}", samples_s=f"{samples_per_second:.1f}", refresh=False)
        if self.writer is not None and step % self.log_every == 0:
            self.writer.add_scalar("train/loss", loss, global_step)
            self.writer.add_scalar("train/samples_per_second", samples_per_second, global_step)
            for name, value in scalars.items():
                self.writer.add_scalar(f"train/{name}", value, global_step)

    def end_stage(self, summary: StageSummary, total: int) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.add_scalar("stage/final_loss", summary.final_loss, summary.stage)
            self.writer.add_scalar("stage/teacher_evals", summary.teacher_evals, summary.stage)
            self.writer.flush()
        self.say(summary.line(total))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
