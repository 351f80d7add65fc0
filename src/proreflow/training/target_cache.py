"""The target cache (recipe ``target_cache``): the original teacher's work on disk, paid once.

Two kinds of entry, each in a folder named by a hash of everything its content depends on, so that a
run with other settings makes (and fills) another folder and a stale entry is never read:

- :class:`TargetCache`, stages with ``start_points: data``: the reflow batches of each micro-batch,
  ``root/<key>/<step>-<micro>-<rank>.pt``, shared by runs that differ in the loss or the optimiser only.
- :class:`TrajectoryCache`, stages with ``start_points: teacher``: one trajectory of the original teacher
  per dataset item, from its noise through the ``K + 1`` edges of the recipe's finest teacher-start
  windows (:func:`~proreflow.targets.teacher_trajectory`), solved once and read by every stage whose
  windows nest in them (8 -> 4 -> 2 -> 1) and by later runs::

      root/trajectories-<key>/key.json                 the settings the key hashes (readable)
      root/trajectories-<key>/shard-00000.safetensors  items [0, SHARD_SIZE): states (n, K + 1, *item shape),
                                                       cond_digest (n, 16) uint8; metadata: key, first,
                                                       count, digest (BLAKE2b of both tensors' bytes)

  Item ``j``'s trajectory starts from :func:`~proreflow.training.batches.trajectory_noise` and follows the
  condition of dataset item ``j``. The key hashes the teacher's weights, prediction type, schedule and time
  scale, ``K``, the solver and its steps per fine window, the guidance and null condition, the seed, the
  item count, the mixed precision and the shard size. Each shard is written atomically
  (:func:`~proreflow.files.atomic_write`) by one process (shard ``s`` by process ``s % P``); at a stage's
  first step every shard is checked (present, readable, its key and digest right) and a missing or
  damaged one is solved again, so a run killed while building resumes where it stopped. Reading item ``j``
  also checks the digest of its condition: a dataset whose conditions changed under the same key is
  refused, with the folder to delete named.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..conditioning import Cond
from ..files import atomic_write, write_json
from ..schedules import VP_TIME_CONVENTION
from ..targets import ReflowBatch
from ..windows import TimeWindows
from .checkpoint import save_torch

log = logging.getLogger("proreflow.training")

SHARD_SIZE = 256
"""Trajectories per shard file."""
TRAJECTORY_FORMAT = 2
"""2: VP times follow :data:`~proreflow.schedules.VP_TIME_CONVENTION` (1: ``tau = t * (T - 1)``)."""
BATCH_FIELDS = tuple(f.name for f in dataclasses.fields(ReflowBatch))


def tensor_bytes(tensor: Tensor) -> bytes:
    """The raw bytes of a tensor (any dtype, bfloat16 included), for hashing."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def weights_digest(tensors: dict[str, Tensor], digest=None) -> str:
    """BLAKE2b of named tensors (names and bytes, in name order), fed to ``digest`` when one is given: the
    original teacher's weights in a key (:meth:`~proreflow.training.setup.DistillationSetup.teacher_tensors`)."""
    digest = digest or hashlib.blake2b(digest_size=10)
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def cond_digests(cond: Cond, n: int) -> Tensor:
    """A 16-byte BLAKE2b of each of the ``n`` samples' condition (its leaves' paths, dtypes and values);
    leaves of batch size 1 belong to every sample. Shape ``(n, 16)``, uint8."""
    leaves: list[tuple[str, Tensor]] = []

    def collect(node: Cond, path: str) -> None:
        if isinstance(node, dict):
            for key in sorted(node):
                collect(node[key], f"{path}.{key}")
        elif node is not None:
            leaves.append((path, node.detach().cpu()))

    collect(cond, "")
    out = torch.empty(n, 16, dtype=torch.uint8)
    for i in range(n):
        digest = hashlib.blake2b(digest_size=16)
        for path, leaf in leaves:
            digest.update(f"{path}:{leaf.dtype}".encode())
            digest.update(tensor_bytes(leaf[i if leaf.shape[0] == n else 0]))
        out[i] = torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)
    return out


class TargetCache:
    """Reflow batches of an original-teacher stage with ``start_points: data`` on disk (module doc).

    A batch depends only on the teacher, the stage's windows / solver and its steps / guidance / dropout, the
    recipe seed, the stage index, the batch layout and the stream position (:mod:`.batches`), so runs that
    differ in anything else (loss, learning rate, EMA, step count) share them: the teacher's solve, most of
    an original-teacher stage's cost, is paid once. Files: ``root/<key>/<step>-<micro>-<rank>.pt``, where
    ``key`` hashes all of the above, the teacher's weights, the time convention and the schedule (a flow
    teacher's ``shift`` / ``window_space`` move every target).
    """

    def __init__(self, root: str | Path, teacher: dict[str, Tensor], parts: tuple, schedule, rank: int):
        """``teacher``: the original teacher's tensors; ``parts``: the stage's settings the batches depend on
        (class doc); ``rank``: this process's index."""
        digest = hashlib.blake2b(digest_size=10)  # the teacher's bytes, the parts, the time convention, the schedule
        weights_digest(teacher, digest)
        digest.update(repr(parts).encode())
        digest.update(VP_TIME_CONVENTION.encode())
        digest.update(schedule_digest(schedule).encode())
        self.folder, self.rank = Path(root) / digest.hexdigest(), rank

    def batch(self, step: int, micro: int, make: Callable[[], tuple[ReflowBatch, int]],
              x0: Tensor) -> tuple[ReflowBatch, int]:
        """The cached batch of ``(step, micro)`` and the teacher evaluations it cost, made (``make``: the batch
        and its evaluations) and stored on a miss.

        ``x0``: the micro-batch's data. Its digest is stored with the batch and checked on a hit: the key
        names the dataset by its length only, so another dataset of that length is refused here, not trained on
        (batches of earlier versions, stored without a digest, are read as before)."""
        path = self.folder / f"{step}-{micro}-{self.rank}.pt"
        data = hashlib.blake2b(tensor_bytes(x0), digest_size=16).hexdigest()
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            if saved.get("x0_digest", data) != data:
                raise ValueError(f"target_cache: {self.folder} holds targets of other data of the same size (step "
                                 f"{step}); delete that folder or choose another target_cache for this dataset")
            return ReflowBatch(**{k: saved[k] for k in BATCH_FIELDS}), int(saved["teacher_evals"])
        batch, evals = make()
        self.folder.mkdir(parents=True, exist_ok=True)
        saved = {**{k: getattr(batch, k).cpu() for k in BATCH_FIELDS}, "teacher_evals": evals, "x0_digest": data}
        atomic_write(path, lambda tmp: save_torch(saved, tmp))
        return batch, evals


def schedule_digest(schedule) -> str:
    """BLAKE2b of a schedule: its repr (a flow schedule's fields) and its tensors (a VP table)."""
    digest = hashlib.blake2b(repr(schedule).encode(), digest_size=8)
    for value in dataclasses.asdict(schedule).values() if dataclasses.is_dataclass(schedule) else ():
        if isinstance(value, Tensor):
            digest.update(tensor_bytes(value))
    return digest.hexdigest()


class TrajectoryCache:
    """The original teacher's trajectories of one stage on disk (module doc): made complete on construction
    (the missing or damaged shards solved), then read by :meth:`pairs`.

    ``settings``: what the trajectories depend on (module doc), the key's material; it must hold ``windows``
    (``K``), ``steps_per_window``, ``items`` and ``item_shape``; the format and shard size are added here.
    ``solve(indices)``: the trajectories of those dataset items, ``(n, K + 1, *item shape)`` on the CPU, and
    their conditions' :func:`cond_digests`; called ``micro_batch`` items at a time. ``processes``: the
    accelerator (its process index and count, main-process flag and barrier)."""

    def __init__(self, root: str | Path, settings: dict[str, Any], solve: Callable[[list[int]], tuple[Tensor, Tensor]],
                 micro_batch: int, processes: Any):
        self.settings = {**settings, "format": TRAJECTORY_FORMAT, "shard_size": SHARD_SIZE}
        key = hashlib.blake2b(json.dumps(self.settings, sort_keys=True).encode(), digest_size=10).hexdigest()
        self.key, self.folder = key, Path(root) / f"trajectories-{key}"
        self.edges = TimeWindows(self.settings["windows"])
        self.items, self.item_shape = self.settings["items"], tuple(self.settings["item_shape"])
        self.solve, self.micro_batch = solve, micro_batch
        if processes.is_main_process:
            self._check_key_file()
        processes.wait_for_everyone()
        shards = range((self.items + SHARD_SIZE - 1) // SHARD_SIZE)
        for shard in shards[processes.process_index::processes.num_processes]:
            problem = self._problem(shard)
            if problem is not None:
                if problem != "missing":
                    log.warning("target_cache: %s is %s; solving its trajectories again", self._path(shard), problem)
                self._build(shard)
        processes.wait_for_everyone()

    def _path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.safetensors"

    def _span(self, shard: int) -> range:
        return range(shard * SHARD_SIZE, min(self.items, (shard + 1) * SHARD_SIZE))

    def _check_key_file(self) -> None:
        """Write ``key.json``, or refuse a folder whose ``key.json`` holds other settings (a collision or an edit)."""
        path = self.folder / "key.json"
        if path.is_file():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                saved = None
            if saved is not None and saved != self.settings:
                raise ValueError(f"target_cache: {path} holds the trajectories of other settings than its name says; "
                                 f"delete {self.folder} (it is rebuilt)")
            if saved is not None:
                return
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(path, self.settings)

    def _problem(self, shard: int) -> str | None:
        """None for a complete shard of this key, else what is wrong with it."""
        path = self._path(shard)
        if not path.is_file():
            return "missing"
        span = self._span(shard)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                states, digests = f.get_tensor("states"), f.get_tensor("cond_digest")
        except Exception as err:  # safetensors raises its own error types for a damaged file
            return f"unreadable ({type(err).__name__})"
        if (meta.get("key"), meta.get("first"), meta.get("count")) != (self.key, str(span.start), str(len(span))):
            return "another key's or another span's"
        if states.shape != (len(span), self.edges.count + 1, *self.item_shape) or digests.shape != (len(span), 16):
            return "of the wrong shape"
        if meta.get("digest") != _content_digest(states, digests):
            return "damaged (its content digest differs)"
        return None

    @torch.no_grad()
    def _build(self, shard: int) -> None:
        """Solve the trajectories of one shard's items in micro-batches and write the shard."""
        span = self._span(shard)
        solved = [self.solve(list(range(start, min(span.stop, start + self.micro_batch))))
                  for start in range(span.start, span.stop, self.micro_batch)]
        tensors = {"states": torch.cat([states for states, _ in solved]).contiguous(),
                   "cond_digest": torch.cat([digests for _, digests in solved])}
        meta = {"key": self.key, "first": str(span.start), "count": str(len(span)),
                "digest": _content_digest(tensors["states"], tensors["cond_digest"])}
        atomic_write(self._path(shard), lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def pairs(self, indices: list[int], first: Tensor, last: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        """``(x_start, x_end)``: the states at edges ``first`` and ``last`` of items ``indices``' trajectories
        (on the CPU); refuses items whose condition is not the one their trajectory was solved for."""
        digests = cond_digests(cond, len(indices))
        starts, ends = [None] * len(indices), [None] * len(indices)
        by_shard: dict[int, list[int]] = {}
        for row, j in enumerate(indices):
            by_shard.setdefault(j // SHARD_SIZE, []).append(row)
        for shard, rows in by_shard.items():
            with safe_open(str(self._path(shard)), framework="pt") as f:
                saved, states = f.get_slice("cond_digest"), f.get_slice("states")
                for row in rows:
                    j = indices[row]
                    offset = j - shard * SHARD_SIZE
                    if not torch.equal(saved[offset:offset + 1][0], digests[row]):
                        raise ValueError(f"target_cache: the trajectory of dataset item {j} was solved for another "
                                         f"condition (the dataset changed); delete {self.folder} (it is rebuilt) "
                                         "or set another target_cache")
                    path = states[offset:offset + 1][0]
                    starts[row], ends[row] = path[int(first[row])], path[int(last[row])]
        return torch.stack(starts), torch.stack(ends)


def _content_digest(*tensors: Tensor) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()
