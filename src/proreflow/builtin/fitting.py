"""The one fitting loop of the built-in trainers (the DDPM teachers and the feature classifiers).

Each step draws a batch of indices ``idx ~ U{0, ..., n - 1}^B`` from ``generator``, computes
``loss = loss_of_batch(idx)`` (which may draw more randomness from the same generator, after the
indices), and takes an optimiser step: ``zero_grad``, ``backward``, the gradient norm clipped at
``grad_clip`` (if given), ``optimizer.step()``, ``scheduler.step()``, then ``after_step()``. The
order of the draws is part of what a config produces: the cached models depend on it.

A config gives the same weights bit for bit on the same torch version, device and number of CPU threads:
the threads split a convolution's or matrix product's sums, so another thread count adds in another order
and training drifts apart from there (measured: the MNIST teacher after 20 steps on 1 and on 2 threads).
:func:`fit_record` writes all three into each cached model's record; the cache name holds the config only,
so a cached model is reused whatever the threads.

Not the distillation engine's :class:`~proreflow.training.StageRunner`: that one runs recipes
(stages, resume, several processes, mixed precision) on a ``DistillationSetup``; these trainers
fit a small network on in-memory tensors in one process, in seconds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


def fit_record(device: str | torch.device) -> dict[str, str | int]:
    """What besides the config decides a fitted model's bits (module doc): device, torch, CPU threads."""
    return {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}


def fit_steps(model: nn.Module, loss_of_batch: Callable[[Tensor], Tensor], optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler, *, steps: int, batch_size: int, size: int,
              generator: torch.Generator, device: str | torch.device = "cpu", grad_clip: float | None = None,
              after_step: Callable[[], None] | None = None, desc: str = "fit", progress: bool = True) -> list[float]:
    """Run ``steps`` optimiser steps on batches of ``batch_size`` indices into ``size`` items (module
    doc); returns each step's loss."""
    losses: list[float] = []
    # closed as soon as the loop ends, by an exception too, not when its frame is freed
    with tqdm(range(steps), desc=desc, disable=not progress) as bar:
        for _ in bar:
            idx = torch.randint(0, size, (batch_size,), generator=generator).to(device)
            loss = loss_of_batch(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}", refresh=False)
    return losses
