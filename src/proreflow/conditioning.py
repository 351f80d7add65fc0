"""Operations on conditions: ``None``, a tensor with a batch dimension, or a (nested) dict of them.

Class labels, text embeddings and SDXL's ``added_cond_kwargs`` all pass through these, so the
solvers, guidance and condition dropout never need to know what a condition is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

Cond = Any  # None | Tensor | dict[str, Cond]


def map_cond(fn, cond: Cond, *others: Cond) -> Cond:
    """Apply ``fn`` leaf-wise to ``cond`` (and matching leaves of ``others``)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: map_cond(fn, v, *(o[k] for o in others)) for k, v in cond.items()}
    if isinstance(cond, Tensor):
        return fn(cond, *others)
    raise TypeError(f"a condition must be None, a tensor or a dict of tensors, got {type(cond).__name__}")


def cat_cond(first: Cond, second: Cond) -> Cond:
    """Concatenate two conditions along the batch dimension."""
    return map_cond(lambda a, b: torch.cat([a, b.to(a.device)]), first, second)


def select_cond(keep: Tensor, cond: Cond, other: Cond) -> Cond:
    """Per sample, ``cond`` where ``keep`` is true, else ``other`` (condition dropout)."""

    def pick(a: Tensor, b: Tensor) -> Tensor:
        b = b.to(a.device).expand_as(a) if b.shape[0] == 1 else b.to(a.device)
        return torch.where(keep.reshape(-1, *([1] * (a.ndim - 1))).to(a.device), a, b)

    return map_cond(pick, cond, other)


def index_cond(cond: Cond, index) -> Cond:
    """Rows ``index`` of every leaf."""
    return map_cond(lambda a: a[index], cond)


def expand_cond(cond: Cond, batch: int) -> Cond:
    """Repeat a condition with batch size 1 to ``batch`` rows (no-op otherwise)."""
    return map_cond(lambda a: a.expand(batch, *a.shape[1:]) if a.shape[0] == 1 else a, cond)
