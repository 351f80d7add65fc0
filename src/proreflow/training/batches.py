"""Which samples, times, noise and condition dropout each process uses at each step.

A stage sees its data as one endless stream: epoch ``e`` is a permutation of the dataset seeded
by ``(seed, stage, e)``, and global optimiser step ``s`` (0-based) takes stream positions
``[s B, (s + 1) B)`` for a global batch ``B``. With ``A`` accumulation steps and ``P``
processes each micro-batch holds ``b = B / (A P)`` samples; process ``r`` at micro-step ``m``
takes positions ``s B + m P b + r b + [0, b)``.

Every random number of a sample (its time ``t ~ U(0, 1]``, its condition-dropout draw and its
noise) comes from a generator seeded by ``(seed, stage, position)``; with teacher start points the
noise at t = 1 belongs to the dataset item instead (:func:`trajectory_noise`), so that every stage
reads the same trajectory of it. So a step's global batch and all its randomness are the same
whatever the number of processes, and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from ..conditioning import Cond
from .recipes import check_batch_split


def mix_seed(*parts: int) -> int:
    """A 56-bit seed from integers (stable across runs, processes and platforms)."""
    digest = hashlib.blake2b("/".join(str(int(p)) for p in parts).encode(), digest_size=7).digest()
    return int.from_bytes(digest, "little")


class BatchPlan:
    """The stream positions and dataset indices of every micro-batch of a stage (module doc)."""

    def __init__(self, num_items: int, seed: int, stage: int, batch_size: int, grad_accum: int,
                 num_processes: int = 1, rank: int = 0):
        if num_items < 1:
            raise ValueError("the training dataset is empty")
        check_batch_split(f"stages.{stage}", batch_size, grad_accum, num_processes)
        self.num_items, self.seed, self.stage = num_items, seed, stage
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.num_processes, self.rank = num_processes, rank
        self.micro_batch = batch_size // (grad_accum * num_processes)
        self._perm = lru_cache(maxsize=2)(self._permutation)

    def _permutation(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.stage, epoch, 0x0E70C4))
        return torch.randperm(self.num_items, generator=g)

    def positions(self, step: int, micro: int) -> range:
        """Stream positions of this process's micro-batch ``micro`` at optimiser step ``step`` (0-based)."""
        start = step * self.batch_size + (micro * self.num_processes + self.rank) * self.micro_batch
        return range(start, start + self.micro_batch)

    def indices(self, positions: range) -> list[int]:
        """Dataset indices at stream positions."""
        return [int(self._perm(p // self.num_items)[p % self.num_items]) for p in positions]


def sample_randomness(positions: range, seed: int, stage: int, shape: tuple[int, ...], dtype: torch.dtype,
                      cond_dropout: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample ``(t, keep, noise)``: ``t ~ U(0, 1]``, ``keep`` = condition kept (probability
    ``1 - cond_dropout``), ``noise ~ N(0, I)`` of ``shape``; each from its own seeded generator."""
    ts, keeps, noises = [], [], []
    for p in positions:
        g = torch.Generator().manual_seed(mix_seed(seed, stage, p))
        u = torch.rand(2, generator=g, dtype=torch.float64)
        ts.append(1.0 - u[0])
        keeps.append(u[1] >= cond_dropout)
        noises.append(torch.randn(shape, generator=g, dtype=dtype))
    return torch.stack(ts).to(dtype), torch.stack(keeps), torch.stack(noises)


WINDOW_SEED = 0x3C0A7
"""Tag of the seeds of :func:`window_counts`."""


def window_counts(positions: range, seed: int, stage: int, choices: tuple[int, ...]) -> Tensor:
    """The window count each sample of ``positions`` trains at (a stage's ``extra_windows``): one of ``choices``
    with equal chance, from a generator seeded by ``(seed, stage, position)`` apart from
    :func:`sample_randomness`'s, so a stage without extra windows draws what it drew before."""
    if len(choices) == 1:
        return torch.full((len(positions),), choices[0], dtype=torch.long)
    picks = [int(torch.randint(len(choices), (1,), generator=torch.Generator().manual_seed(
        mix_seed(seed, stage, p, WINDOW_SEED)))) for p in positions]
    return torch.tensor([choices[i] for i in picks], dtype=torch.long)


TRAJECTORY_SEED = 0x7A3EC7
"""Tag of the seeds of :func:`trajectory_noise` (apart from the per-position ones)."""


def trajectory_noise(indices: list[int], seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The noise at t = 1 of each dataset item's teacher trajectory (``start_points: teacher``): ``N(0, I)``
    of ``shape`` from a generator seeded by ``(seed, item)``, the same in every stage, epoch and process."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(mix_seed(seed, TRAJECTORY_SEED, j)),
                                    dtype=dtype) for j in indices])


def start_mask(positions: range, share: float) -> Tensor:
    """Which samples of ``positions`` train at their window's start: position ``p`` iff
    ``floor((p + 1) share) > floor(p share)``, i.e. exactly ``share`` of every long run of the stream,
    spread evenly and the same whatever the number of processes (the stream's order is random)."""
    p = torch.tensor(list(positions), dtype=torch.float64)
    return torch.floor((p + 1) * share) > torch.floor(p * share)


def collate_items(items: list[tuple]) -> tuple[Tensor, Cond, list[str]]:
    """Stack ``(x0, cond)`` items into ``(x0, cond, skipped)``; ``cond`` may be None, a tensor, a
    number or a dict of them. An item may carry a third element, the names of the dataset items
    skipped to reach it (see :class:`~proreflow.training.setup.DistillationSetup`); ``skipped``
    lists them all, in item order, so they reach the main process from loader workers too."""
    if any(len(item) not in (2, 3) for item in items):
        raise ValueError("dataset items must be (x0, cond) or (x0, cond, skipped names)")
    xs = default_collate([torch.as_tensor(item[0]) for item in items])
    skipped = [str(name) for item in items if len(item) == 3 for name in item[2]]
    conds = [item[1] for item in items]
    if all(c is None for c in conds):
        return xs, None, skipped
    if any(c is None for c in conds):
        raise ValueError("some dataset items have a condition and some have None: give every item one")
    return xs, default_collate(conds), skipped


def micro_batches(source: Any, plan: BatchPlan, start_step: int, num_workers: int = 0
                  ) -> Iterator[tuple[Tensor, Cond, list[str]]]:
    """The one micro-batch source: endless iterator over this process's micro-batches ``(x0, cond, skipped)``
    (:func:`collate_items`) of ``plan`` from ``start_step`` on. ``source``: a map-style dataset (item at stream
    position ``p``: ``source[plan.indices(p)]``) or a stream (:class:`~proreflow.training.streams.Stream`: its own
    ``reader``)."""
    if not hasattr(source, "reader") and (isinstance(source, IterableDataset) or not hasattr(source, "__getitem__")):
        raise TypeError("the training dataset must be map-style (__len__ and __getitem__) or a proreflow Stream, "
                        f"got {type(source).__name__}")
    loader = DataLoader(_PlannedBatches(source, plan, start_step), batch_size=None, collate_fn=_as_is,
                        num_workers=num_workers)
    return iter(loader)


def _as_is(batch):
    return batch


class _PlannedBatches(IterableDataset):
    """The micro-batches of one process from ``start_step`` on; DataLoader worker ``w`` of ``W`` builds
    this process's micro-batches ``w, w + W, w + 2 W, ...`` (the loader returns them round robin)."""

    def __init__(self, source: Any, plan: BatchPlan, start_step: int):
        self.source, self.plan, self.start_step = source, plan, start_step

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan
        if hasattr(self.source, "reader"):
            item = self.source.reader(plan.seed, plan.stage)
        else:
            def item(p: int, dataset=self.source):
                return dataset[plan.indices(range(p, p + 1))[0]]
        for k in itertools.count(worker, workers):
            step, micro = self.start_step + k // plan.grad_accum, k % plan.grad_accum
            yield collate_items([item(p) for p in plan.positions(step, micro)])
