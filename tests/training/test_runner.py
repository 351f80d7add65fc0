"""StageRunner / run_steps: a stage's optimiser steps in memory, the same steps as ``train``."""

from __future__ import annotations

import pytest
import torch
from helpers.engine_toys import MLP, make_setup, tiny_recipe
from safetensors.torch import load_file

from proreflow.training import NonFiniteLossError, StageRunner, make_accelerator, run_steps, train

ONE_STAGE = tiny_recipe(stages=[{"windows": 4, "steps": 6}],
                        defaults={"lr": 1e-2, "batch_size": 8, "grad_accum": 2, "ema_decay": 0.8, "warmup_steps": 2,
                                  "solver_steps": 2, "guidance": 2.0, "cond_dropout": 0.25})


def test_runner_takes_the_steps_of_train_and_writes_nothing(tmp_path, monkeypatch):
    trained = train(ONE_STAGE, make_setup(), tmp_path / "run", progress=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    runner = StageRunner(ONE_STAGE, make_setup(), 0)
    losses = [runner.step().loss for _ in range(2)]
    counters = runner.run(4)  # goes on where step() stopped
    assert runner.step_index == 6
    assert losses == [loss for _, loss in trained.history[:2]]  # and the EMA of all 6 steps is the stage result:
    ema = runner.ema.state_dict(runner.module)
    stage1 = load_file(str(tmp_path / "run/stage-1-4w/ema.safetensors"))
    assert ema.keys() == stage1.keys()
    for key in ema:
        torch.testing.assert_close(ema[key], stage1[key], rtol=0, atol=0)
    # counters of the 4 steps of run(); the runner's own are the stage's totals (guided: 2 per call)
    assert (counters.teacher_evals, counters.samples, counters.skipped) == (4 * 8 * 2 * 2, 4 * 8, 0)
    assert runner.counters.teacher_evals == trained.stages[0].teacher_evals == 6 * 8 * 2 * 2
    assert counters.seconds > 0
    runner.close()
    with pytest.raises(RuntimeError, match="closed"):
        runner.step()
    assert not any(work.iterdir())


def test_run_steps_of_a_later_stage_and_its_previous_teacher(tmp_path):
    recipe = tiny_recipe()  # 4 -> 2 windows, stage 2 learns from the previous student
    counters = run_steps(recipe, make_setup(), stage_index=1, steps=2)
    assert (counters.teacher_evals, counters.samples, counters.skipped) == (2 * 8 * 2, 2 * 8, 0)  # 2 Euler steps

    def first_loss(previous=None) -> float:
        with StageRunner(recipe, make_setup(), 1, previous=previous) as runner:
            return runner.step().loss

    default = first_loss()  # the previous student: the runner's starting student, the teacher's weights
    assert first_loss(make_setup().teacher_model.state_dict()) == default
    assert first_loss(MLP(5).state_dict()) != default


def test_runner_errors():
    with pytest.raises(IndexError, match="stage index 2: the recipe has 2 stage"):
        StageRunner(tiny_recipe(), make_setup(), 2)
    accelerator = make_accelerator("no")
    with pytest.raises(ValueError, match="runs mixed precision 'no' but the recipe says mixed_precision: bf16"):
        StageRunner(tiny_recipe(mixed_precision="bf16"), make_setup(), 0, accelerator)
    setup = make_setup()
    setup.teacher_model.poison = True  # non-finite targets at every step
    runner = StageRunner(tiny_recipe(max_nonfinite=2), setup, 0, accelerator)
    with pytest.raises(NonFiniteLossError, match=r"stage 1, step 2: 2 optimiser steps had a non-finite loss"):
        runner.run(5)
    assert runner.counters.skipped == 2 and runner.step_index == 2
