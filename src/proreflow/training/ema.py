"""Exponential moving average of a student's weights.

After optimiser step ``k`` (1-based), for each parameter ``w``:

    ema <- d_k * ema + (1 - d_k) * w,    d_k = min(decay, (1 + k) / (10 + k))

the warm-up of diffusers' ``EMAModel``: early steps average over a short window, so a stage of a
few hundred steps is not dominated by its initial weights (a plain ``decay = 0.999`` keeps
``0.999^400 = 67%`` of them after 400 steps). After ``n`` steps at a constant ``w``:
``ema_n = P ema_0 + (1 - P) w`` with ``P = prod_k d_k``. ``d_k`` depends on the step number
alone, so a resumed stage continues the same average. The EMA starts equal to the weights (each
stage starts from its initial student), is what a stage hands to the next one, what is saved as
the stage result, and what is sampled and exported.

Only the parameters trainable when the EMA is made (``requires_grad=True``) are averaged and
held: a LoRA student's EMA is the size of its LoRA layers, not of the frozen base UNet. Frozen
parameters never change, so their average is the student's own value: :meth:`EMA.state_dict`
takes them (and buffers, e.g. normalisation statistics) from the module, giving the full EMA
student; :meth:`EMA.tensors` is the averages alone (what a mid-stage checkpoint stores). Of a
student that FSDP2 shards, each average is a shard like its parameter (:mod:`.sharding` gathers them).

Kept beside diffusers' ``EMAModel`` (same warm-up) because this one is keyed by parameter name
(checkpoints, LoRA students, tied weights) and takes the step number from the caller instead of
counting updates itself, so a resumed stage needs no EMA step counter. The built-in teacher
trainer keeps torch's ``AveragedModel`` (see ``builtin.teacher._ema_avg`` for why).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .sharding import shard_like


class EMA:
    """EMA copies of ``module``'s trainable parameters, keyed by parameter name."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, Tensor] = {name: p.detach().clone() for name, p in module.named_parameters()
                                          if p.requires_grad}

    def decay_at(self, step: int) -> float:
        """``d_k = min(decay, (1 + k) / (10 + k))`` for optimiser step ``k`` (1-based)."""
        if step < 1:
            raise ValueError(f"EMA steps count from 1, got {step}")
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """``ema <- d_k * ema + (1 - d_k) * w`` after optimiser step ``step`` (1-based)."""
        weight = 1.0 - self.decay_at(step)
        pairs = [(self.shadow[name], p.detach()) for name, p in _tracked(module, self.shadow)]
        if pairs:  # one multi-tensor call instead of a kernel per parameter (hundreds per step for a UNet)
            torch._foreach_lerp_([s for s, _ in pairs], [p.to(s.dtype) for s, p in pairs], weight)

    def tensors(self) -> dict[str, Tensor]:
        """The averaged tensors alone, keyed by parameter name (trainable parameters only);
        :meth:`load_state_dict` reads them back."""
        return dict(self.shadow)

    def state_dict(self, module: nn.Module) -> dict[str, Tensor]:
        """``module.state_dict()`` with the EMA values in place of the trainable parameters: the full
        EMA student (loadable into module). Frozen parameters and buffers are the module's own tensors."""
        aliases = _parameter_aliases(module)
        return {key: self.shadow[aliases[key]] if aliases.get(key) in self.shadow else value
                for key, value in module.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Set the EMA values from :meth:`tensors` or :meth:`state_dict` (other keys are ignored); full
        tensors are cut into the shards of a student that FSDP2 shards (:mod:`.sharding`)."""
        missing = [name for name in self.shadow if name not in state]
        if missing:
            raise KeyError(f"EMA state lacks parameters {missing[:5]}: it was saved from another model")
        with torch.no_grad():
            for name, value in self.shadow.items():
                value.copy_(shard_like(state[name], value))

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Overwrite ``module``'s (trainable) parameters with the EMA values."""
        for name, p in _tracked(module, self.shadow):
            p.copy_(self.shadow[name])


def _tracked(module: nn.Module, shadow: dict[str, Tensor]):
    return ((name, p) for name, p in module.named_parameters() if name in shadow)


def _parameter_aliases(module: nn.Module) -> dict[str, str]:
    """Every state-dict name of a parameter -> the name ``named_parameters()`` keeps (tied weights)."""
    canonical = {id(p): name for name, p in module.named_parameters()}
    return {name: canonical[id(p)] for name, p in module.named_parameters(remove_duplicate=False)}
