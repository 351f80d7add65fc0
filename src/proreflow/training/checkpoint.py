"""The run folder: checkpoints and stage results on disk (loading the trained student: :mod:`.student`).

Layout of an output folder ``OUT``::

    OUT/recipe.yaml                      the recipe of the run (resolved)
    OUT/checkpoints/latest               name of the newest checkpoint (written atomically)
    OUT/checkpoints/step-00000500/       one checkpoint (global optimiser step 500)
        meta.json                        recipe, stage index, step in stage, counters, summaries
        state.pt                         optimiser, grad scaler, loss history (weights_only=True)
        rng-<rank>.pt                    RNG states of each process (weights_only=True)
        student.safetensors              raw student weights   } mid-stage only; a checkpoint at a
        ema.safetensors                  EMA of the trainable  } stage end points to stage-<i>-*
                                         parameters only (the frozen ones are the student's)
    OUT/stage-<i>-<windows>w/            result of stage i (1-based): the EMA student (full weights;
        ema.safetensors, student.json    without the frozen ones for a student that shares the
                                         teacher's network, e.g. LoRA: those are the teacher's)
    OUT/checkpoints/step-*/checksums.json, OUT/stage-<i>-<windows>w/checksums.json
                                         SHA-256 of every other file of the folder, written last
    OUT/student.safetensors, student.json   the newest stage result: what sampling loads
    OUT/summary.json                     per-stage summaries (time, teacher evaluations, loss)

Every file and checkpoint folder is written under a temporary name (holding the writer's process
id) and renamed into place, so an interrupted write never leaves a half checkpoint behind; the
temporaries a killed run leaves are removed when the next run in the folder starts. Nothing is
unpickled: weights are safetensors, other state is loaded with ``torch.load(weights_only=True)``.

A checkpoint is resumed only when its contents check out (:func:`resume_checkpoint`): each file's
SHA-256 against its folder's ``checksums.json``, every weights file whole, finite and (given the
run's :class:`Layout`) holding exactly the student's / EMA's tensor names, shapes and dtypes, the
optimiser state shaped as the student's trainable parameters, and ``meta.json`` a place in its own
recipe. Folders written before checksums existed have no ``checksums.json``: the other checks apply.
"""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..files import atomic_write, atomic_write_text, file_sha256, replace_dir, temporary_path, write_json
from .recipes import Recipe, RecipeError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
CHECKSUMS = "checksums.json"
STUDENT_FORMAT = 1


# ---------------------------------------------------------------- weights


class NonFiniteWeightsError(ValueError):
    """Weights about to be written hold NaN or infinite values (nothing was written)."""


def nonfinite_count(value: Tensor) -> int:
    """How many values of ``value`` are NaN or infinite (0 for a tensor that is not floating point)."""
    if not value.is_floating_point() or bool(torch.isfinite(value).all()):
        return 0
    return int((~torch.isfinite(value)).sum())


def first_nonfinite(tensors: dict[str, Tensor]) -> str | None:
    """``"KEY holds N non-finite value(s) of M"`` for the first tensor of ``tensors`` with a NaN / inf value,
    or None when all are finite."""
    for key, value in tensors.items():
        bad = nonfinite_count(value)
        if bad:
            return f"{key} holds {bad} non-finite value(s) of {value.numel()}"
    return None


def check_finite(tensors: dict[str, Tensor], what: str) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first tensor of ``tensors`` with a NaN / inf value."""
    bad = first_nonfinite(tensors)
    if bad:
        raise NonFiniteWeightsError(f"{what}: {bad}; nothing was written")


def save_weights(state_dict: dict[str, Tensor], path: Path) -> None:
    """A state dict as safetensors (CPU copies, so tied weights do not share storage), atomically;
    checked to be finite before anything is written."""
    check_finite(state_dict, f"refusing to write {path.name}")
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def recorded_recipe(meta: dict[str, Any]) -> Recipe:
    """The recipe a checkpoint's ``meta.json`` records, in today's keys: runs from before ``report_to`` recorded
    ``tensorboard: true / false``, and runs from before ``student_prediction`` trained the teacher's type."""
    raw = {"student_prediction": "teacher", **meta["recipe"]}
    if "tensorboard" in raw:
        tensorboard = raw.pop("tensorboard")
        if tensorboard and raw.get("report_to", "none") == "none":
            raw["report_to"] = "tensorboard"
    return Recipe.from_dict(raw)


def load_weights(path: Path) -> dict[str, Tensor]:
    return load_file(str(path))


def frozen_names(module: nn.Module) -> set[str]:
    """The state-dict names of ``module``'s frozen parameters (``requires_grad=False``), tied ones included."""
    return {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


TensorSpec = tuple[tuple[int, ...], torch.dtype]
"""A tensor's shape and dtype."""


@dataclass(frozen=True)
class Layout:
    """The tensors a run's files hold for the student the run builds, as name -> (shape, dtype).

    student: a mid-stage checkpoint's ``student.safetensors`` and a stage result's ``ema.safetensors``:
        the student's state dict, less the frozen parameters of a student that shares the teacher's
        network (:meth:`~.stage_runner.Trainee.saved`). ema: a mid-stage checkpoint's ``ema.safetensors``, the
        averages of the trainable parameters (:meth:`~.ema.EMA.tensors`). params: the shapes of the
        optimiser's parameters (the trainable ones), in its order.
    """

    student: dict[str, TensorSpec]
    ema: dict[str, TensorSpec]
    params: list[tuple[int, ...]]

    @classmethod
    def of(cls, module: nn.Module, leave_out_frozen: bool = False) -> Layout:
        """The layout of ``module``, a student as the run builds it before loading any weights;
        ``leave_out_frozen``: its files leave its frozen parameters out (one network, ``Trainee.shared``)."""
        frozen = frozen_names(module) if leave_out_frozen else set()
        trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        return cls({key: (tuple(v.shape), v.dtype) for key, v in module.state_dict().items() if key not in frozen},
                   {name: (tuple(p.shape), p.dtype) for name, p in trainable}, [tuple(p.shape) for _, p in trainable])


# ---------------------------------------------------------------- checksums




def write_checksums(folder: Path) -> None:
    """Write ``folder/checksums.json``: the SHA-256 of every other file in ``folder``. Written last (into the
    temporary folder, before it is renamed into place), so it covers everything the folder holds."""
    write_json(folder / CHECKSUMS, {p.name: file_sha256(p) for p in sorted(Path(folder).iterdir())
                                    if p.is_file() and p.name != CHECKSUMS})


def check_checksums(folder: Path, error=ValueError, prefix: str = "") -> None:
    """Raise ``error`` naming the first file (``prefix`` + its name) listed in ``folder/checksums.json`` that is
    missing or whose SHA-256 differs (bit rot, a file overwritten or copied over); a folder without the file was
    written before checksums were: nothing to check."""
    path = Path(folder) / CHECKSUMS
    if not path.exists():
        return
    try:
        sums = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise error(f"{prefix}{CHECKSUMS} is unreadable: {_brief(err)}") from None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise error(f"{prefix}{CHECKSUMS} is not a mapping of file names to SHA-256 sums")
    for name, expected in sums.items():
        file = Path(folder) / name
        if Path(name).name != name or not file.is_file():
            raise error(f"{prefix}{name} is missing (listed in {CHECKSUMS})")
        if file_sha256(file) != expected:
            raise error(f"{prefix}{name} does not match its SHA-256 in {CHECKSUMS}: its contents changed after it "
                        "was written")


# ---------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), Python and NumPy RNG states, as weights_only-safe types."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------- checkpoints


def checkpoint_name(global_step: int) -> str:
    return f"step-{global_step:08d}"


_NAME = re.compile(r"step-\d{8,}")
META_KEYS = {"format": int, "recipe": dict, "stage": int, "step": int, "global_step": int, "counters": dict,
             "completed": list}
"""The keys of a checkpoint's ``meta.json`` and their types."""


class CheckpointError(RuntimeError):
    """The checkpoint to resume from cannot be had: a name that is not a checkpoint of the run (bad input),
    or :class:`DamagedCheckpointError`."""


class DamagedCheckpointError(CheckpointError):
    """The run's checkpoints are there but damaged: none complete is left, or the one named is damaged (a
    run-time failure of the files, not bad input: the command line exits with code 1)."""


class DamagedCheckpoint(Exception):
    """One file of a checkpoint is missing or unreadable (the message names it and what is wrong)."""


@dataclass
class Checkpoint:
    """A checkpoint verified complete: its folder, ``meta.json``, ``state.pt`` and this process's RNG state."""

    path: Path
    meta: dict[str, Any]
    state: dict[str, Any]
    rng: dict[str, Any] | None


def _pointed(root: Path) -> Path | None:
    """The checkpoint ``root/latest`` names, if it names a checkpoint folder inside ``root``."""
    try:
        name = (root / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return root / name if _NAME.fullmatch(name) else None


def _candidates(root: Path) -> list[Path]:
    """Checkpoint folders, newest first: the one ``latest`` names, then the others by step."""
    found = sorted((p for p in root.glob("step-*") if _NAME.fullmatch(p.name) and p.is_dir()), reverse=True)
    pointed = _pointed(root)
    return ([pointed] if pointed in found else []) + [p for p in found if p != pointed]


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint ``OUT/checkpoints/latest`` names (else the newest with a meta.json), or None.

    Only a folder ``step-NNNNNNNN`` inside ``OUT/checkpoints`` counts: a pointer naming any other path
    (``../../other-run/...``) is ignored. Nothing is verified; :func:`resume_checkpoint` does that.
    """
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    return next((p for p in _candidates(root) if (p / "meta.json").is_file()), None)


def resume_checkpoint(out_dir: Path, rank: int = 0, warn=None, layout: Layout | None = None) -> Checkpoint | None:
    """The newest checkpoint whose contents check out (module doc; ``layout``: the run's, to check the tensors
    against), or None if there is none.

    A damaged checkpoint is reported with ``warn(line)`` (which file, what is wrong) and the one
    before it is tried. Raises :class:`DamagedCheckpointError` when checkpoints exist but all are damaged.
    """
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.exists() and _pointed(root) is None and warn is not None:
        warn(f"{pointer} does not name a checkpoint folder of this run (step-NNNNNNNN); ignored")
    damaged = []
    for path in _candidates(root):
        try:
            checkpoint = _verify(path, Path(out_dir), rank, layout)
        except DamagedCheckpoint as err:
            damaged.append(f"{path.name}: {err}")
            if warn is not None:
                warn(f"checkpoint {path} is damaged ({err}); trying the one before it")
            continue
        return checkpoint
    if damaged:
        raise DamagedCheckpointError(f"no complete checkpoint left in {root} ({'; '.join(damaged)}); delete {out_dir} "
                              "to start over, or give another output folder")
    return None


def named_checkpoint(out_dir: Path, name: str) -> Path:
    """The folder of checkpoint ``name`` of the run in ``out_dir``: a folder name (``step-00000500``), a
    global step (``500``) or the folder's path; a CheckpointError naming the ones there when it is absent."""
    root = Path(out_dir) / CHECKPOINTS
    text = str(name).strip()
    match = re.fullmatch(r"(?:step-)?(\d+)", text)
    if match:
        path = root / checkpoint_name(int(match.group(1)))
    else:
        path = Path(text)
        if path.parent.resolve() != root.resolve() or not _NAME.fullmatch(path.name):
            raise CheckpointError(f"--resume-from {name}: not a checkpoint of {out_dir}; give a name such as "
                                  f"step-00000500, a global step such as 500, or a folder in {root}")
        path = root / path.name
    if not path.is_dir():
        there = sorted(p.name for p in root.glob("step-*") if _NAME.fullmatch(p.name) and p.is_dir())
        raise CheckpointError(f"--resume-from {name}: {path} does not exist; checkpoints in {root}: "
                              f"{', '.join(there) if there else 'none'}")
    return path


def open_checkpoint(path: Path, out_dir: Path, rank: int = 0, layout: Layout | None = None) -> Checkpoint:
    """Checkpoint ``path`` (of the run in ``out_dir``) verified complete, or a DamagedCheckpointError saying
    what is damaged (no fallback to another one: it was asked for by name)."""
    try:
        return _verify(Path(path), Path(out_dir), rank, layout)
    except DamagedCheckpoint as err:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged ({err}); give another one, or --resume for the "
                              "newest complete one") from None


def discard_newer_checkpoints(out_dir: Path, checkpoint: Path) -> list[str]:
    """Delete the checkpoints after ``checkpoint`` (a continuation this run replaces) and point ``latest`` at
    it (main process); the names deleted."""
    root = Path(out_dir) / CHECKPOINTS
    step = int(checkpoint.name.removeprefix("step-"))
    newer = sorted(p for p in root.glob("step-*")
                   if _NAME.fullmatch(p.name) and p.is_dir() and int(p.name.removeprefix("step-")) > step)
    for path in newer:
        shutil.rmtree(path)
    atomic_write_text(root / LATEST, checkpoint.name + "\n")
    return [p.name for p in newer]


def _verify(path: Path, out_dir: Path, rank: int, layout: Layout | None = None) -> Checkpoint:
    """Check a checkpoint's contents (module doc) and read its meta, state and RNG state; a DamagedCheckpoint
    names the first file that fails. ``layout``: the run's, to check the tensors against (None: not known yet,
    as when the command line checks the folder before the setup is built)."""
    def load(name: str) -> Any:
        file = path / name
        if not file.is_file():
            raise DamagedCheckpoint(f"{name} is missing")
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or garbage files raise many kinds of errors
            raise DamagedCheckpoint(f"{name} is unreadable: {_brief(err)}") from None

    meta = _read_meta(path)
    stages = recorded_recipe(meta).stages
    stage, step = meta["stage"], meta["step"]
    state = load("state.pt")
    if not isinstance(state, dict) or not isinstance(state.get("history"), Tensor):
        raise DamagedCheckpoint("state.pt holds no loss history")
    if step > 0 and not isinstance(state.get("optimizer"), dict):
        raise DamagedCheckpoint("state.pt holds no optimiser state")
    if step > 0:
        _check_optimizer_state(state["optimizer"], layout.params if layout is not None else None)
    rng_name = f"rng-{rank}.pt"
    rng = None
    if (path / rng_name).exists() or rank < int(meta.get("num_processes", 1)):
        rng = load(rng_name)
        if not isinstance(rng, dict) or not {"torch", "python", "numpy"} <= set(rng):
            raise DamagedCheckpoint(f"{rng_name} holds no RNG state")
    if step > 0:
        for stem in ("student", "ema"):
            check_weights_file(path / f"{stem}.safetensors", DamagedCheckpoint, f"{stem}.safetensors",
                               getattr(layout, stem, None))
    if stage > 0:
        folder = stage_dir(out_dir, stage - 1, stages[stage - 1].windows)
        check_weights_file(folder / "ema.safetensors", DamagedCheckpoint, f"{folder.name}/ema.safetensors",
                           layout.student if layout is not None else None)
        check_checksums(folder, DamagedCheckpoint, f"{folder.name}/")
    check_checksums(path, DamagedCheckpoint)  # last: what the checks above cannot see (finite bit rot, copies)
    return Checkpoint(path, meta, state, rng)


def _read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json``, checked to be a place in its own recipe: the keys of :data:`META_KEYS`;
    a stage index within the recipe (its length: the run's end); a step within its stage's steps (a stage's
    last step is written as the next stage's step 0); one summary per finished stage; a global step (the
    folder's name) that is the steps of the finished stages plus the step."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedCheckpoint("meta.json is missing") from None
    except (OSError, ValueError) as err:
        raise DamagedCheckpoint(f"meta.json is not valid JSON: {_brief(err)}") from None
    if not isinstance(meta, dict):
        raise DamagedCheckpoint(f"meta.json holds a {type(meta).__name__}, not a mapping")
    for key, kind in META_KEYS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            what = "missing" if key not in meta else f"not a {kind.__name__}"
            raise DamagedCheckpoint(f"meta.json: {key!r} is {what}")
    try:
        stages = recorded_recipe(meta).stages
    except RecipeError as err:
        raise DamagedCheckpoint(f"meta.json: its recipe is invalid ({err})") from None
    stage, step, completed = meta["stage"], meta["step"], meta["completed"]
    if not (0 <= stage <= len(stages) and step >= 0 and (step == 0 or stage < len(stages))):
        raise DamagedCheckpoint(f"meta.json: stage {stage}, step {step} is not a place in its recipe")
    if step > 0 and step >= stages[stage].steps:
        raise DamagedCheckpoint(f"meta.json: step {step} lies beyond stage {stage + 1}, which has "
                                f"{stages[stage].steps} steps (its last one is written as stage {stage + 2}, step 0)")
    done = [s.get("steps") if isinstance(s, dict) else None for s in completed]
    if len(done) != stage or not all(isinstance(n, int) and not isinstance(n, bool) for n in done):
        raise DamagedCheckpoint(f"meta.json: 'completed' does not hold one summary per finished stage ({stage})")
    if meta["global_step"] != sum(done) + step or path.name != checkpoint_name(meta["global_step"]):
        raise DamagedCheckpoint(f"meta.json: global step {meta['global_step']} is not the steps of its finished "
                                f"stages ({sum(done)}) plus its step ({step}) in checkpoint {path.name}")
    return meta


def _check_optimizer_state(state: dict[str, Any], params: list[tuple[int, ...]] | None) -> None:
    """A DamagedCheckpoint unless the optimiser state's tensors are finite and, given the shapes of the
    student's trainable parameters (``params``, in the optimiser's order), it is of that many parameters,
    each moment (AdamW's ``exp_avg``, ``exp_avg_sq``) shaped as its parameter."""
    groups, per_param = state.get("param_groups"), state.get("state")
    if not isinstance(groups, list) or not isinstance(per_param, dict):
        raise DamagedCheckpoint("state.pt: the optimiser state has no param_groups / state")
    count = sum(len(g.get("params", ())) for g in groups if isinstance(g, dict))
    if params is not None and count != len(params):
        raise DamagedCheckpoint(f"state.pt: the optimiser state is of {count} parameters, the student trains "
                                f"{len(params)}")
    for index, values in per_param.items():
        if not isinstance(values, dict) or not isinstance(index, int) or not 0 <= index < count:
            raise DamagedCheckpoint(f"state.pt: the optimiser state of parameter {index!r} is not one of {count}")
        for key, value in values.items():
            if not isinstance(value, Tensor):
                continue
            if nonfinite_count(value):
                raise DamagedCheckpoint(f"state.pt: the optimiser's {key} of parameter {index} holds "
                                        f"{nonfinite_count(value)} non-finite value(s)")
            if params is not None and key in ("exp_avg", "exp_avg_sq") and tuple(value.shape) != params[index]:
                raise DamagedCheckpoint(f"state.pt: the optimiser's {key} of parameter {index} has shape "
                                        f"{list(value.shape)}, the parameter {list(params[index])}")


def check_weights_file(path: Path, error=ValueError, name: str | None = None,
                       expected: dict[str, TensorSpec] | None = None) -> None:
    """Raise ``error`` naming the file (``name``, default ``path``) unless it is a complete safetensors
    file (its header read and its size checked against it) whose tensors are finite and, given ``expected``
    (name -> (shape, dtype), a :class:`Layout`'s), exactly those names with those shapes and dtypes. The
    tensors are read one at a time."""
    name = name or str(path)
    if not path.is_file():
        raise error(f"{name} is missing")
    try:
        problem = _weights_problem(path, expected)
    except Exception as err:  # SafetensorError, OSError
        problem = f"is unreadable: {_brief(err)}"
    if problem:
        raise error(f"{name} {problem}")


def _weights_problem(path: Path, expected: dict[str, TensorSpec] | None) -> str | None:
    """What is wrong with the tensors of safetensors file ``path`` (:func:`check_weights_file`), or None."""
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        if expected is not None and set(keys) != set(expected):
            return _other_names(set(keys), set(expected))
        for key in keys:
            value = f.get_tensor(key)
            if expected is not None and (tuple(value.shape), value.dtype) != expected[key]:
                return (f"holds other tensors than the student's: {key} is {_spec(value.shape, value.dtype)}, "
                        f"the student's {_spec(*expected[key])}")
            bad = nonfinite_count(value)
            if bad:
                return f"holds non-finite values: {key} has {bad} of {value.numel()}"
    return None


def _other_names(found: set[str], expected: set[str]) -> str:
    """The tensors (up to 3 of each kind) ``found`` lacks of ``expected`` and holds beyond them."""
    parts = [f"{what}: {', '.join(sorted(keys)[:3])}{' ...' if len(keys) > 3 else ''}"
             for what, keys in (("missing", expected - found), ("unexpected", found - expected)) if keys]
    return f"holds other tensors than the student's ({'; '.join(parts)})"


def _spec(shape, dtype: torch.dtype) -> str:
    return f"{list(shape)} {str(dtype).removeprefix('torch.')}"


def _brief(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``; a write that fails (torch reports a full disk as a RuntimeError of its zip
    writer) is an OSError (EIO) naming the file."""
    try:
        torch.save(obj, path)
    except RuntimeError as err:
        raise OSError(errno.EIO, f"writing {path} failed ({_brief(err)}): the disk may be full or failing") from err


def write_checkpoint(accelerator, out_dir: Path, global_step: int, meta: dict[str, Any],
                     state: dict[str, Any], weights: dict[str, dict[str, Tensor]], keep: int,
                     tag: int | None = None) -> Path:
    """Write a checkpoint from every process (each saves its RNG state), atomically, ``checksums.json`` last;
    prune old ones.

    ``weights``: file stem -> state dict (``student``, ``ema``), written by the main process. ``tag``: the
    main process's id, which names the temporary folder (``.step-N.tmp-PID``: unique to the writing run);
    every process must give the same one (default: this process's id, right for one process).
    """
    root = Path(out_dir) / CHECKPOINTS
    final = root / checkpoint_name(global_step)
    tmp = temporary_path(final, tag=tag)
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        save_torch(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for stem, sd in weights.items():
                save_weights(sd, tmp / f"{stem}.safetensors")
            save_torch(state, tmp / "state.pt")
            write_json(tmp / "meta.json", meta)
            write_checksums(tmp)  # every process's RNG file is there (the barrier above)
    except BaseException:  # a full disk, a second stop signal: the half-written folder goes now
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        replace_dir(tmp, final)
        atomic_write_text(root / LATEST, final.name + "\n")
        _prune(root, keep, final)
    accelerator.wait_for_everyone()
    return final


def _prune(root: Path, keep: int, newest: Path) -> None:
    if keep <= 0:
        return
    older = sorted(p for p in root.glob("step-*") if p.is_dir() and p != newest)
    for path in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(path)


# ---------------------------------------------------------------- stage results and the student


def stage_dir(out_dir: Path, index: int, windows: int) -> Path:
    """Folder of stage ``index``'s (0-based) result: ``OUT/stage-<index + 1>-<windows>w``."""
    return Path(out_dir) / f"stage-{index + 1}-{windows}w"


def write_stage_result(out_dir: Path, index: int, weights: dict[str, Tensor], info: dict[str, Any]) -> None:
    """Save stage ``index``'s EMA student in its stage folder (with its ``checksums.json``) and as
    ``OUT/student.*`` (main process)."""
    out_dir = Path(out_dir)
    final = stage_dir(out_dir, index, info["windows"])
    tmp = temporary_path(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_weights(weights, tmp / "ema.safetensors")
    write_json(tmp / "student.json", info)
    write_checksums(tmp)
    replace_dir(tmp, final)
    save_weights(weights, out_dir / "student.safetensors")
    write_json(out_dir / "student.json", info)
