"""Full tensors of a student that FSDP2 shards, and back.

Under accelerate's FSDP plugin with ``fsdp_version: 2`` (``torch.distributed.fsdp.fully_shard``) the
student's parameters, their EMA copies and AdamW's moments are ``DTensor`` shards: each of N processes
holds about 1/N of every tensor (``Shard(0)``). What a run writes and checks is the full tensor:

    full = all_gather(shard_0, ..., shard_{N-1})        (:func:`full_tensors`, one collective per tensor)
    shard_r = the r-th ``torch.chunk`` of full           (:func:`shard_like`, no communication)

so the files of an FSDP run are those of a single-process run (full tensors, the optimiser's usual
``state_dict`` keyed by parameter order) and a run resumes under any process layout. Any other tensor
passes through unchanged, so under DDP or on one process these are identities.

Kept as our own instead of ``torch.distributed.checkpoint.state_dict`` because that API covers a
module and its optimiser only (the EMA is a plain dict of DTensors), and its optimiser state is keyed
by parameter name, where the checkpoints of non-FSDP runs hold ``Optimizer.state_dict()``, keyed by
parameter order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support: nothing can be sharded
    DTensor, distribute_tensor = (), None


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor (FSDP2)."""
    return any_dtensor(module.parameters())


def any_dtensor(tensors: Iterable[Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor (a shard of FSDP2)."""
    return any(isinstance(t, DTensor) for t in tensors)


def full_tensors(tensors: dict[str, Any], keep: bool = True) -> dict[str, Any]:
    """``tensors`` with every DTensor all-gathered into its full tensor, on the CPU (one at a time, so the
    device holds one full tensor at most). Every process must call it (collective). With ``keep=False``
    (processes that write nothing) the gathered tensors are dropped instead of kept."""
    out = {}
    for key, value in tensors.items():
        if isinstance(value, DTensor):
            value = value.full_tensor().cpu()
            if keep:
                out[key] = value
        else:
            out[key] = value
    return out


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` cut into ``like``'s shard on this process when ``like`` is a DTensor (each process takes its
    own chunk of the full tensor it holds: no communication); else ``full`` itself."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def full_optimizer_state(state: dict[str, Any], keep: bool = True) -> dict[str, Any]:
    """An optimiser's ``state_dict()`` with its per-parameter DTensors gathered (:func:`full_tensors`)."""
    return {**state, "state": {index: full_tensors(values, keep) for index, values in state["state"].items()}}


def sharded_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A full optimiser ``state_dict`` cut into the shards of ``optimizer``'s DTensor parameters (moments
    shaped like their parameter; scalars such as ``step`` stay as they are), ready for ``load_state_dict``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(isinstance(p, DTensor) for p in params):
        return state
    return {**state, "state": {index: {key: shard_like(value, params[int(index)])
                                       if isinstance(value, Tensor) and value.shape == params[int(index)].shape
                                       else value for key, value in values.items()}
                               for index, values in state["state"].items()}}


def reshard(module: nn.Module) -> None:
    """Put the parameters of FSDP2 units in ``module`` back into shards: forward passes without a backward
    (sampling) leave the root unit's gathered, and the module would list full tensors as its parameters."""
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def local(tensor: Tensor) -> Tensor:
    """This process's part of ``tensor``: a DTensor's local shard, any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
