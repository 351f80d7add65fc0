"""Optimiser settings of a stage: AdamW (torch, or bitsandbytes' 8-bit AdamW) and the learning rate.

The learning rate of the ``k``-th optimiser step of a stage (``k = 1, 2, ...``) is

    lr_k = lr * f(k)

where ``f`` is the factor of ``diffusers.optimization.get_scheduler(lr_schedule, ...)`` over the
stage's ``steps`` with its ``warmup_steps`` (the ``lr_lambda`` of its ``LambdaLR``). The default,
``constant_with_warmup``, is ``f(k) = min(1, k / warmup_steps)`` (1 without warm-up). The rate is
set before each step, so it is a function of the step alone: a resumed run needs no scheduler state.
diffusers' training scripts step their scheduler after the optimiser, so their step ``k`` runs at
``f(k - 1)`` (a warm-up's first step at lr 0); here step ``k`` runs at ``f(k)``, the rate their
scheduler holds after ``k`` steps (a decaying schedule's last step at its end value, 0 for linear
and cosine). AdamW's betas, epsilon and weight decay are set with the rate, from the stage.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch
from torch import nn

from .recipes import Stage


@functools.lru_cache(maxsize=16)
def _factor(name: str, warmup_steps: int, steps: int, num_cycles: int, power: float, lr: float
            ) -> Callable[[int], float]:
    from diffusers.optimization import get_scheduler

    # a throwaway optimiser: get_scheduler's LambdaLR writes into the param groups it is given
    # (polynomial reads its start rate there)
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = get_scheduler(name, probe, num_warmup_steps=warmup_steps, num_training_steps=steps,
                              num_cycles=num_cycles, power=power)
    return scheduler.lr_lambdas[0]


def stage_lr(stage: Stage, step: int) -> float:
    """Learning rate of optimiser step ``step`` (1-based) of ``stage``: ``lr * f(step)`` (module doc)."""
    if stage.lr_schedule == "constant_with_warmup" and stage.warmup_steps <= 0:
        return stage.lr  # f = 1
    factor = _factor(stage.lr_schedule, stage.warmup_steps, stage.steps, stage.lr_num_cycles, stage.lr_power,
                     stage.lr)
    return stage.lr * factor(step)


def check_optimizer(name: str) -> None:
    """A ValueError naming the fix when optimizer ``name`` cannot be made here (bitsandbytes missing)."""
    if name == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("optimizer: 'adamw_8bit' needs bitsandbytes, which is not installed; pip install "
                         "bitsandbytes, or use optimizer: adamw")


def make_optimizer(module: nn.Module, name: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (``name`` 'adamw', torch's) or 8-bit AdamW ('adamw_8bit', ``bitsandbytes.optim.AdamW8bit``)
    over the trainable parameters. Learning rate, betas, epsilon and weight decay are set before every
    step (:func:`set_stage_hyperparameters`); a new stage clears the state."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters (requires_grad=False everywhere)")
    if name == "adamw_8bit":
        check_optimizer(name)
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params)
    if name != "adamw":
        raise ValueError(f"optimizer: {name!r} is not one of adamw, adamw_8bit")
    return torch.optim.AdamW(params, fused=_fusable(params))


def _fusable(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel (one kernel over all parameters) can take ``params``: floating
    point tensors on CPU or CUDA. torch's default there is a per-parameter loop on CPU (foreach on CUDA):
    on the built-in CPU UNet the step took 22 ms looped against 3.4 ms fused, a fifth of a batch-2
    optimiser step (docs/throughput.md). Other devices keep torch's default."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def set_stage_hyperparameters(optimizer: torch.optim.Optimizer, stage: Stage, step: int) -> float:
    """Put step ``step``'s learning rate and the stage's AdamW settings in every param group; the rate."""
    lr = stage_lr(stage, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = stage.weight_decay
        group["betas"] = (stage.adam_beta1, stage.adam_beta2)
        group["eps"] = stage.adam_epsilon
    return lr
