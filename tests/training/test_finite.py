"""Finite weights, always: non-finite gradients are skipped like non-finite losses, a stage whose
every step was skipped fails, and no file is ever written with a NaN or infinite weight."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.engine_toys import MLP, Mixture, make_setup, tiny_recipe
from safetensors.torch import load_file

from proreflow.training import NonFiniteLossError, train
from proreflow.training.checkpoint import NonFiniteWeightsError, save_weights


def assert_every_file_finite(root: Path) -> int:
    """Every safetensors file under ``root`` holds finite values only; returns how many were read."""
    files = sorted(root.rglob("*.safetensors"))
    for path in files:
        for key, value in load_file(str(path)).items():
            assert torch.isfinite(value).all(), f"{path}: {key} is not finite"
    return len(files)


class _InfGrad(torch.autograd.Function):
    """Identity forward; backward returns an infinite gradient (a finite loss, a non-finite gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class GradBomb(MLP):
    """The MLP, whose gradient is infinite at the training-mode forward calls in ``bombs`` (1-based)."""

    def __init__(self, bombs=()):
        super().__init__(0)
        self.bombs, self.calls = set(bombs), 0

    def forward(self, x, timestep, cond):
        out = super().forward(x, timestep, cond)
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            if self.calls in self.bombs:
                return _InfGrad.apply(out)
        return out


class NaNAt(Mixture):
    """The mixture with NaN samples at the given item reads (1-based): a non-finite loss at those steps."""

    def __init__(self, calls=range(0)):
        super().__init__()
        self.calls, self.nan_calls = 0, calls

    def __getitem__(self, i):
        self.calls += 1
        x, label = super().__getitem__(i)
        return (x * float("nan") if self.calls in self.nan_calls else x), label


def _setup(bombs=(), nan_calls=range(0)):
    setup = make_setup()
    teacher = GradBomb(bombs)
    teacher.load_state_dict(setup.teacher_model.state_dict())
    setup.teacher_model, setup.dataset = teacher, NaNAt(nan_calls)
    return setup


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_a_nonfinite_gradient_is_skipped_exactly_like_a_nonfinite_loss(tmp_path, grad_clip):
    """Steps 2 and 4 of a stage: an infinite gradient (finite loss) in one run, a NaN loss in the other.
    Both skip them without touching weights, optimiser state or EMA: the runs end bit-identical."""
    recipe = tiny_recipe(max_nonfinite=5, checkpoint_every=3, keep_checkpoints=0,
                         defaults={"lr": 1e-2, "batch_size": 8, "steps": 6, "solver_steps": 2, "grad_clip": grad_clip,
                                   "ema_decay": 0.8},
                         stages=[{"windows": 4}])
    bombed = train(recipe, _setup(bombs={2, 4}), tmp_path / "grad", progress=False)
    nan = train(recipe, _setup(nan_calls=set(range(8 + 1, 2 * 8 + 1)) | set(range(3 * 8 + 1, 4 * 8 + 1))),
                tmp_path / "loss", progress=False)
    assert bombed.stages[0].skipped == nan.stages[0].skipped == 2
    assert [s for s, _ in bombed.history] == [s for s, _ in nan.history] == [1, 3, 5, 6]
    for name in ("student.safetensors", "stage-1-4w/ema.safetensors", "checkpoints/step-00000003/student.safetensors",
                 "checkpoints/step-00000003/ema.safetensors"):
        a, b = load_file(str(tmp_path / "grad" / name)), load_file(str(tmp_path / "loss" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert assert_every_file_finite(tmp_path) == 2 * 4


def test_a_stage_whose_every_step_was_skipped_fails(tmp_path):
    """2 steps, both non-finite, max_nonfinite 10: the run fails; nothing NaN (no stage result) is written."""
    recipe = tiny_recipe(max_nonfinite=10, stages=[{"windows": 4, "steps": 2}])
    with pytest.raises(NonFiniteLossError, match=r"stage 1: all 2 optimiser steps were skipped"):
        train(recipe, _setup(bombs={1, 2}), tmp_path, progress=False)
    assert not (tmp_path / "student.safetensors").exists() and not list(tmp_path.glob("stage-*"))
    assert_every_file_finite(tmp_path)


def test_the_cli_exits_nonzero_when_every_step_was_skipped(tmp_path, capsys):
    from proreflow.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("setup: {name: test_finite:nan_setup}\nname: x\nmax_nonfinite: 10\n"
                      "stages: [{windows: 4, steps: 2, batch_size: 8, solver_steps: 2}]\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "all 2 optimiser steps were skipped" in err and "Traceback" not in err
    assert not (tmp_path / "run/student.safetensors").exists()


def nan_setup():
    """A setup whose every sample is NaN (for the CLI test above)."""
    return _setup(nan_calls=range(1, 10**6))


def test_weights_are_checked_before_they_are_written(tmp_path):
    good, bad = torch.ones(3), torch.tensor([1.0, float("nan"), float("inf")])
    with pytest.raises(NonFiniteWeightsError, match=r"w holds 2 non-finite value\(s\) of 3; nothing was written"):
        save_weights({"v": good, "w": bad}, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())  # no file, no temporary file
    save_weights({"v": good, "step": torch.tensor([2**62])}, tmp_path / "x.safetensors")
    assert load_file(str(tmp_path / "x.safetensors"))["v"].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("override", ["lr=.inf", "lr=1e400", "weight_decay=.inf", "alpha=.nan", "beta=-1",
                                      "lr=1e3", "weight_decay=50", "grad_clip=1e400", "guidance=1e9"])
def test_absurd_hyperparameters_are_rejected_when_the_recipe_is_read(override):
    from proreflow.training.recipes import RecipeError, load_recipe

    key = override.partition("=")[0]
    with pytest.raises(RecipeError, match=rf"stages\.0\.{key}: must be"):
        load_recipe("perflow", [f"stages.*.{override}"])


def test_nonfinite_parameters_counts_nan_and_inf_tensors_and_not_large_finite_ones():
    from torch import nn

    from proreflow.training.step import nonfinite_parameters

    module = nn.ParameterList([nn.Parameter(torch.tensor([1.0, float("nan")])),
                               nn.Parameter(torch.tensor([3e38, -3e38])),  # finite; its 2-norm would overflow
                               nn.Parameter(torch.tensor([float("-inf"), 0.0])),
                               nn.Parameter(torch.zeros(2, dtype=torch.bfloat16)),
                               nn.Parameter(torch.tensor([float("inf")]), requires_grad=False)])  # frozen: ignored
    assert nonfinite_parameters(module) == 2
