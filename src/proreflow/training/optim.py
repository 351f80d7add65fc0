"""Optimiser settings of a stage: AdamW and the warm-up learning rate.

The learning rate of the ``k``-th optimiser step of a stage (``k = 1, 2, ...``) is

    lr_k = lr * min(1, k / warmup_steps)        (lr_k = lr when warmup_steps = 0),

set before each step, so it is a function of the step alone (no scheduler state to save).
``diffusers.optimization.get_scheduler("constant_with_warmup")`` is a ``LambdaLR`` whose first step
runs at lr 0 and whose state a resumed run would have to restore; this rule needs neither.
"""

from __future__ import annotations

import torch
from torch import nn

from .recipes import Stage


def warmup_lr(lr: float, step: int, warmup_steps: int) -> float:
    """Learning rate of optimiser step ``step`` (1-based) with linear warm-up."""
    if warmup_steps <= 0:
        return lr
    return lr * min(1.0, step / warmup_steps)


def make_optimizer(module: nn.Module) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (betas 0.9 / 0.999, eps 1e-8). Learning rate and weight
    decay are set before every step (:func:`set_stage_hyperparameters`); a new stage clears its state."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters (requires_grad=False everywhere)")
    return torch.optim.AdamW(params)


def set_stage_hyperparameters(optimizer: torch.optim.Optimizer, stage: Stage, step: int) -> float:
    """Put step ``step``'s learning rate and the stage's weight decay in every param group."""
    lr = warmup_lr(stage.lr, step, stage.warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = stage.weight_decay
    return lr
