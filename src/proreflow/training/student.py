"""The trained student of a run: its network rebuilt as the run built it, its weights and ``student.json``.

A run's ``OUT/student.safetensors`` and ``OUT/student.json`` (or a stage folder's ``ema.safetensors``) are
written by :mod:`.checkpoint`; :func:`trained_student` loads them into a network built as the run built it, from the
run's setup (:func:`load_student`) or from a teacher's network alone (the families' exports,
:func:`proreflow.sd.export.load_run_student`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..step_conditioning import attach_step_conditioning, fold_step_count, time_embedding_layers
from ..teachers import Denoiser
from ..windows import MAX_WINDOWS, TimeWindows
from .checkpoint import frozen_names, load_weights
from .setup import DistillationSetup


def load_student_weights(module: nn.Module, state: dict[str, Tensor], assign: bool = False) -> None:
    """Load a student's saved weights into ``module`` (a student built as the run built it).

    ``state`` must hold every tensor of ``module`` except, possibly, frozen parameters
    (``requires_grad=False``): a student that shares the teacher's network leaves those out of its
    files (they are the teacher's, :meth:`~.stage_runner.Trainee.saved`), so ``module`` keeps its own
    (the teacher's, in ``module``'s dtype). A key ``module`` lacks, or a trainable one ``state``
    lacks, is a ValueError. ``assign``: take the saved tensors (and dtypes) instead of copying.
    """
    missing, unexpected = module.load_state_dict(state, strict=False, assign=assign)
    frozen = frozen_names(module)
    lacking = [key for key in missing if key not in frozen]
    if lacking or unexpected:
        raise ValueError("the saved student does not fit this network: "
                         + "; ".join(f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                                     for what, keys in (("missing", lacking), ("unexpected", unexpected)) if keys)
                         + " (load it with the setup it was trained with)")


def student_module(setup: DistillationSetup, from_scratch: bool, seed: int = 0,
                   step_counts: Sequence[int] = ()) -> nn.Module:
    """A student network: a copy of the teacher, or ``setup.make_student()`` initialised from torch's
    generator seeded with ``seed`` (the recipe's: the same run starts from the same weights; the global
    generator is left as it was); with ``step_counts`` conditioned on those window counts
    (:func:`~proreflow.step_conditioning.attach_step_conditioning`, zero offsets).

    The copy keeps the teacher's ``requires_grad`` flags where some are set: they say what the
    student trains (e.g. only LoRA layers). A teacher frozen throughout gives a student that
    trains every weight.
    """
    if from_scratch:
        if setup.make_student is None:
            raise ValueError("from_scratch: true needs a setup with make_student (a builder of a fresh network); "
                             "this setup only has a teacher to copy: set from_scratch: false, or use a setup "
                             "that builds a student")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = setup.make_student()
    else:
        module = copy.deepcopy(setup.teacher_model)
        if not any(p.requires_grad for p in module.parameters()):
            module.requires_grad_(True)
    if step_counts:
        attach_step_conditioning(module, step_counts)
    return module


def trained_student(folder: str | Path, network: nn.Module, stem: str = "student", steps: int | None = None,
                    assign: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The one student loader: the weights ``folder/<stem>.safetensors`` loaded into ``network`` (built as the run
    built it: :func:`student_module` from the run's setup, or a family's copy of its teacher's network) and
    ``folder/student.json``; in eval mode, frozen. ``steps``: the window count to fold a step-conditioned student
    at (:func:`~proreflow.step_conditioning.fold_step_count`; ``network`` is then the stock one and the returned
    info's ``windows`` is ``steps``). ``assign``: take the saved tensors (and dtypes) instead of copying."""
    folder = Path(folder)
    info = read_student_info(folder)
    state = load_weights(folder / f"{stem}.safetensors")
    if steps is not None:
        state = fold_step_count(state, info["step_counts"], time_embedding_layers(network), steps)
        info = {**info, "windows": steps, "exported_steps": steps}
    load_student_weights(network, state, assign=assign)
    return network.eval().requires_grad_(False), info


def load_student(out_dir: str | Path, setup: DistillationSetup, stage: int | None = None,
                 device=None) -> tuple[Denoiser, TimeWindows]:
    """The trained (EMA) student of a run and its windows, rebuilt with the run's setup (:func:`trained_student`).

    stage: 1-based stage whose result to load (default: the newest, ``OUT/student.*``).
    """
    out_dir = Path(out_dir)
    if stage is None:
        folder, stem = out_dir, "student"
    else:
        found = sorted(out_dir.glob(f"stage-{stage}-*w"))
        if not found:
            raise FileNotFoundError(f"{out_dir} has no result for stage {stage} (no stage-{stage}-*w folder)")
        folder, stem = found[0], "ema"
    info_path = (folder / "student.json")
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} not found: {out_dir} holds no finished stage of a training run")
    info = read_student_info(folder)
    try:
        prediction_type = setup.student_prediction_type(info.get("prediction_type"), info.get("from_scratch", False))
    except ValueError:
        raise ValueError(f"the student in {folder} predicts {info.get('prediction_type')!r}, which the setup's "
                         f"teacher ({setup.prediction_type!r}) cannot serve: load it with the setup it was trained "
                         "with") from None
    module = student_module(setup, info.get("from_scratch", False), step_counts=info.get("step_counts", ()))
    module, info = trained_student(folder, module, stem, assign=True)  # saved dtypes
    if device is not None:
        module.to(device)
    return setup.denoiser(module, prediction_type=prediction_type), TimeWindows(int(info["windows"]))


def read_student_info(out_dir: str | Path) -> dict[str, Any]:
    """``OUT/student.json`` (or a stage folder's): windows, prediction type, sampling guidance, recipe,
    stage, setup info. The one reader of the file."""
    path = Path(out_dir) / "student.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # also undecodable bytes
        raise ValueError(f"{path} is not valid JSON ({err}); the run's files are damaged") from None
    if not isinstance(info, dict) or not isinstance(info.get("info", {}), dict) or "windows" not in info:
        raise ValueError(f"{path} is not a student record of `proreflow train`")
    windows = info["windows"]
    if isinstance(windows, bool) or not isinstance(windows, int) or not 1 <= windows <= MAX_WINDOWS:
        raise ValueError(f"{path}: windows is {windows!r}, not a count of 1 to {MAX_WINDOWS}; the run's files are "
                         "damaged")
    return info
