"""EMA of the student's weights and the warm-up learning rate: closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from proreflow.training import EMA
from proreflow.training.optim import make_optimizer, set_stage_hyperparameters, stage_lr
from proreflow.training.recipes import Stage


def kept_fraction(decay: float, n: int) -> float:
    """P = prod_{k=1..n} min(decay, (1 + k) / (10 + k)): the share of ema_0 left after n steps."""
    return math.prod(min(decay, (1 + k) / (10 + k)) for k in range(1, n + 1))


def test_ema_warmup_decay_schedule():
    ema = EMA(nn.Linear(1, 1), 0.9)
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(80) == pytest.approx(81 / 90) and ema.decay_at(81) == 0.9  # (1+k)/(10+k) reaches 0.9
    assert ema.decay_at(10_000) == 0.9
    with pytest.raises(ValueError, match="count from 1"):
        ema.decay_at(0)


@pytest.mark.parametrize("decay, n", [(0.9, 7), (0.9, 120), (0.999, 400)])
def test_ema_closed_form(decay, n):
    """At constant weights w: ema_n = P ema_0 + (1 - P) w, P = prod_k min(decay, (1+k)/(10+k)).
    With the warm-up, decay 0.999 keeps under 3% of the start after 400 steps (not 0.999^400 = 67%)."""
    module = nn.Linear(3, 2).double()
    start = {k: v.clone() for k, v in module.state_dict().items()}
    ema = EMA(module, decay)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(2.0)
    for k in range(1, n + 1):
        ema.update(module, k)
    kept = kept_fraction(decay, n)
    for name, value in ema.shadow.items():
        torch.testing.assert_close(value, kept * start[name] + (1 - kept) * 2.0, rtol=0, atol=1e-14)
    if decay == 0.999:
        assert kept < 0.03


def test_ema_decay_zero_follows_the_weights_and_copy_to():
    module = nn.Linear(2, 2).double()
    ema = EMA(module, 0.0)
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update(module, 1)
    target = nn.Linear(2, 2).double()
    ema.copy_to(target)
    assert torch.equal(target.weight, module.weight)
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(module, 1.0)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2, bias=False)
        self.b = nn.Linear(2, 2, bias=False)
        self.b.weight = self.a.weight
        self.register_buffer("count", torch.tensor([5.0]))


def test_ema_state_dict_loads_into_the_module_with_tied_weights():
    module = Tied()
    ema = EMA(module, 0.5)
    with torch.no_grad():
        module.a.weight.add_(4.0)
    ema.update(module, 100)  # past the warm-up: d = 0.5
    state = ema.state_dict(module)
    assert set(state) == {"a.weight", "b.weight", "count"}
    torch.testing.assert_close(state["b.weight"], state["a.weight"])
    torch.testing.assert_close(state["a.weight"], module.a.weight.detach() - 2.0)  # halfway from the start
    fresh = EMA(Tied(), 0.5)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.shadow["a.weight"], state["a.weight"])


def test_warmup_learning_rate_values():
    """The default schedule is the linear warm-up lr * min(1, k / warmup_steps), written out."""
    stage = Stage(windows=2, lr=1.0, warmup_steps=4)
    assert [stage_lr(stage, k) for k in (1, 2, 3, 4, 5, 100)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert stage_lr(Stage(windows=2, lr=3e-4), 1) == 3e-4
    assert all(stage_lr(Stage(windows=2, lr=3e-4, warmup_steps=7), k) == 3e-4 * min(1.0, k / 7) for k in range(1, 30))
    stage = Stage(windows=2, lr=0.1, warmup_steps=10, weight_decay=0.5, adam_beta1=0.8, adam_beta2=0.95,
                  adam_epsilon=1e-6)
    optimizer = make_optimizer(nn.Linear(2, 2))
    assert set_stage_hyperparameters(optimizer, stage, 3) == pytest.approx(0.03)
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.03) and group["weight_decay"] == 0.5
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6


def test_optimizer_needs_trainable_parameters():
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(nn.Linear(2, 2).requires_grad_(False))


def test_ema_leaves_frozen_parameters_alone():
    """A LoRA-style student: only trainable parameters are averaged; frozen ones keep their value."""
    module = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)).double()
    module[0].requires_grad_(False)
    ema = EMA(module, 0.5)
    assert set(ema.shadow) == {"1.weight", "1.bias"}
    with torch.no_grad():
        for p in module.parameters():
            p.add_(2.0)
    ema.update(module, 100)
    state = ema.state_dict(module)
    torch.testing.assert_close(state["0.weight"], module[0].weight.detach())
    torch.testing.assert_close(state["1.weight"], module[1].weight.detach() - 1.0)


def test_ema_of_a_lora_like_student_holds_only_the_adapter():
    """Frozen base + trainable adapter: the EMA holds the adapter tensors alone, follows the closed
    form on them, and its full state dict takes the frozen base (and buffers) from the module."""
    from helpers.engine_toys import ADAPTER, Adapted

    module = Adapted()
    start = {k: v.clone() for k, v in module.state_dict().items()}
    ema, decay, n = EMA(module, 0.75), 0.75, 5
    assert set(ema.shadow) == set(ADAPTER) == set(ema.tensors())
    assert sum(v.numel() for v in ema.tensors().values()) == 3 * 2 + 2 * 2  # not the base MLP's weights
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(2.0)  # the base too: a frozen parameter is not averaged even if it moved
    for k in range(1, n + 1):
        ema.update(module, k)
    for name in ADAPTER:
        kept = kept_fraction(decay, n)
        expected = kept * start[name] + (1 - kept) * 2.0
        torch.testing.assert_close(ema.tensors()[name], expected, rtol=0, atol=1e-14)
    full = ema.state_dict(module)
    assert full.keys() == module.state_dict().keys()
    base = {k: v for k, v in module.state_dict().items() if k.startswith("base.")}
    assert base and all(full[k].data_ptr() == v.data_ptr() for k, v in base.items())  # the module's, no copy
    # the averages alone restore the EMA; a full state dict does too
    for state in (ema.tensors(), full):
        fresh = EMA(Adapted(), 0.75)
        fresh.load_state_dict({k: v.clone() for k, v in state.items()})
        for name in ADAPTER:
            torch.testing.assert_close(fresh.shadow[name], ema.shadow[name], rtol=0, atol=0)
    with pytest.raises(KeyError, match="lacks parameters"):
        EMA(Adapted(), 0.75).load_state_dict({"down.weight": full["down.weight"]})
