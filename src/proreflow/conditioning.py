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


def select_cond(keep: Tensor, cond: Cond, other: Cond, keep_paths: tuple[str, ...] = ()) -> Cond:
    """Per sample, ``cond`` where ``keep`` is true, else ``other`` (condition dropout).

    keep_paths: leaves that every sample keeps from ``cond`` whatever ``keep`` says (see
    :func:`null_like`), e.g. ``("added_cond_kwargs.time_ids",)`` for SDXL.
    """
    other = null_like(cond, other, keep_paths)

    def pick(a: Tensor, b: Tensor) -> Tensor:
        b = b.to(a.device).expand_as(a) if b.shape[0] == 1 else b.to(a.device)
        return torch.where(keep.reshape(-1, *([1] * (a.ndim - 1))).to(a.device), a, b)

    return map_cond(pick, cond, other)


def null_like(cond: Cond, uncond: Cond, keep_paths: tuple[str, ...] = ()) -> Cond:
    """The null condition of each sample of ``cond``: ``uncond``, except the leaves at the dotted
    key paths ``keep_paths``, which stay the sample's own.

    Condition dropout and the unconditional branch of guidance use it. For SDXL the text states
    (``encoder_hidden_states``, ``added_cond_kwargs.text_embeds``) are dropped but the
    micro-conditioning ``added_cond_kwargs.time_ids`` (image size, crop) is kept, as in
    diffusers' SDXL training scripts and pipelines. Without ``keep_paths`` (or with ``cond`` or
    ``uncond`` None) this is ``uncond`` itself; leaves of ``uncond`` keep their batch size (1 or
    ``cond``'s). A path that names no leaf of both conditions is an error.
    """
    if not keep_paths or cond is None or uncond is None:
        return uncond
    out = _copy_dicts(uncond)
    for path in keep_paths:
        node_c, node_u, parts = cond, out, path.split(".")
        for i, part in enumerate(parts):
            if not (isinstance(node_c, dict) and isinstance(node_u, dict) and part in node_c and part in node_u):
                raise KeyError(f"keep_paths: {path!r} is not a key path of both the condition and the null "
                               f"condition (condition leaves: {', '.join(_leaf_paths(cond)) or 'one tensor'})")
            if i < len(parts) - 1:
                node_c, node_u = node_c[part], node_u[part]
        if not isinstance(node_c[parts[-1]], Tensor):
            raise KeyError(f"keep_paths: {path!r} names a dict, not a tensor leaf of the condition")
        node_u[parts[-1]] = node_c[parts[-1]]
    return out


def _copy_dicts(cond: Cond) -> Cond:
    """A copy of the dict structure of ``cond`` (leaves shared), whose leaves can be replaced."""
    return {k: _copy_dicts(v) for k, v in cond.items()} if isinstance(cond, dict) else cond


def _leaf_paths(cond: Cond, prefix: str = "") -> list[str]:
    if isinstance(cond, dict):
        return [p for k, v in cond.items() for p in _leaf_paths(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if prefix else []


def expand_cond(cond: Cond, batch: int) -> Cond:
    """Repeat a condition with batch size 1 to ``batch`` rows (no-op otherwise)."""
    return map_cond(lambda a: a.expand(batch, *a.shape[1:]) if a.shape[0] == 1 else a, cond)
