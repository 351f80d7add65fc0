"""Recipe ``student_prediction``: what a student from scratch outputs, read the same way everywhere."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers.engine_toys import MLP, SCHEDULE, make_setup, tiny_recipe
from torch import nn

from proreflow import TimeWindows, output_to_velocity, sample
from proreflow.flow import FlowSchedule
from proreflow.solvers import solve
from proreflow.training import load_student, read_student_info, train
from proreflow.training.recipes import load_recipe
from proreflow.training.step import build_stage_teacher
from proreflow.training.student import student_module


class VelocityOf(nn.Module):
    """The velocity an epsilon network implies towards the end of its window (``windows`` fixed):
    the same function as the epsilon student, written as a velocity output."""

    def __init__(self, eps_net: nn.Module, windows: int):
        super().__init__()
        self.eps_net, self.windows = eps_net, TimeWindows(windows)

    def forward(self, x, timestep, cond):
        t = SCHEDULE.time(timestep.to(torch.float64))
        end = self.windows.bounds(t)[1]
        return output_to_velocity(self.eps_net(x, timestep, cond), x, t, end, "epsilon", SCHEDULE)


def _from_scratch(build) -> object:
    return dataclasses.replace(make_setup(), make_student=build)


def test_the_type_is_the_teachers_unless_a_student_from_scratch_chooses_another():
    setup = make_setup(from_scratch_seed=1)
    assert setup.student_prediction_type() == "epsilon"
    assert setup.student_prediction_type("velocity", from_scratch=True) == "velocity"
    assert setup.student_prediction_type("epsilon", from_scratch=False) == "epsilon"  # the teacher's own
    with pytest.raises(ValueError, match="needs from_scratch: true"):
        setup.student_prediction_type("velocity", from_scratch=False)
    with pytest.raises(ValueError, match="does not fit"):
        setup.student_prediction_type("flow_velocity", from_scratch=True)
    flow = dataclasses.replace(setup, prediction_type="flow_velocity", schedule=FlowSchedule())
    assert flow.student_prediction_type("velocity", from_scratch=True) == "velocity"
    with pytest.raises(ValueError, match="does not fit"):
        flow.student_prediction_type("epsilon", from_scratch=True)


def test_a_velocity_student_trains_as_the_epsilon_student_it_rewrites(tmp_path):
    """One stage, two windows: a from-scratch epsilon student and the same network wrapped to output the
    velocity it implies (``student_prediction: velocity``) are one function, so the engine, reading each
    through its declared type (loss, start share, EMA, saved record), trains them to the same weights."""
    stages = [{"windows": 2, "steps": 8, "start_share": 0.5, "alpha": 1.0}]
    eps = train(tiny_recipe(from_scratch=True, student_prediction="epsilon", stages=stages),
                _from_scratch(lambda: MLP(5)),
                tmp_path / "eps", progress=False)
    vel = train(tiny_recipe(from_scratch=True, student_prediction="velocity", stages=stages),
                _from_scratch(lambda: VelocityOf(MLP(5), 2)), tmp_path / "vel", progress=False)
    torch.testing.assert_close([loss for _, loss in vel.history], [loss for _, loss in eps.history],
                               rtol=1e-9, atol=0)
    trained_eps = eps.module.state_dict()
    for key, value in vel.module.eps_net.state_dict().items():
        torch.testing.assert_close(value, trained_eps[key], rtol=1e-9, atol=1e-12)
    assert read_student_info(tmp_path / "vel")["prediction_type"] == "velocity"
    assert read_student_info(tmp_path / "eps")["prediction_type"] == "epsilon"

    # loaded back, each is read as its own type and samples the same
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond = torch.arange(16) % 2
    student_v, windows = load_student(tmp_path / "vel", _from_scratch(lambda: VelocityOf(MLP(5), 2)))
    student_e, _ = load_student(tmp_path / "eps", _from_scratch(lambda: MLP(5)))
    assert (student_v.prediction_type, student_e.prediction_type) == ("velocity", "epsilon")
    torch.testing.assert_close(sample(student_v, noise, windows, 2, cond), sample(student_e, noise, windows, 2, cond),
                               rtol=1e-9, atol=1e-12)


class Constant(nn.Module):
    """A network whose output is ``c`` everywhere."""

    def __init__(self, c: float):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c, dtype=torch.float64))

    def forward(self, x, timestep, cond):
        return self.c.expand_as(x)


def test_a_previous_velocity_student_teaches_its_next_stage_as_a_velocity():
    """Stage 2's teacher is stage 1's student read as its type: a constant velocity ``c`` crosses a window
    ``[t_start, t_end]`` to exactly ``x + (t_end - t_start) c`` (read as epsilon it would land elsewhere)."""
    recipe = load_recipe(tiny_recipe(from_scratch=True, student_prediction="velocity"))
    setup = make_setup(from_scratch_seed=3)
    teacher, _ = build_stage_teacher(setup, recipe, 1, setup.teacher_model, Constant(0.25))
    assert teacher.denoiser.prediction_type == "velocity"
    x = torch.randn(4, 2, dtype=torch.float64)
    landed = solve(teacher.denoiser, x, 1.0, 0.5, teacher.steps, windows=teacher.windows)
    torch.testing.assert_close(landed, x - 0.5 * 0.25, rtol=0, atol=1e-15)
    original, _ = build_stage_teacher(setup, recipe, 0, setup.teacher_model, None)
    assert original.denoiser.prediction_type == "epsilon"  # the original teacher keeps its own type


def test_a_copied_student_cannot_change_its_output_type(tmp_path):
    with pytest.raises(ValueError, match="needs from_scratch: true"):
        train(tiny_recipe(student_prediction="velocity"), make_setup(), tmp_path, progress=False)
    assert not (tmp_path / "student.json").exists()


def test_a_student_from_scratch_starts_from_the_recipes_seed():
    """``make_student()`` runs under the recipe's seed, so the same recipe starts from the same weights, another
    seed from others, and the caller's global generator is left as it was."""
    setup = make_setup(from_scratch_seed=None)
    setup = dataclasses.replace(setup, make_student=lambda: nn.Linear(3, 2))
    before = torch.random.get_rng_state()
    a, b, c = (student_module(setup, True, seed).weight for seed in (7, 7, 8))
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_auto_is_velocity_from_scratch_and_the_teachers_type_for_a_copy():
    assert load_recipe(tiny_recipe()).resolved_student_prediction == "teacher"
    assert load_recipe(tiny_recipe(from_scratch=True)).resolved_student_prediction == "velocity"
    assert load_recipe(tiny_recipe(from_scratch=True, student_prediction="epsilon")).resolved_student_prediction \
        == "epsilon"
    # the recipe keeps 'auto' until it is read; a resume compares what trained (resolved)
    assert load_recipe(tiny_recipe(from_scratch=True)).student_prediction == "auto"


def test_auto_follows_from_scratch_set_after_loading(tmp_path):
    """A recipe loaded with ``auto`` and then made ``from_scratch`` through the Python API trains a velocity
    student, as the docs promise (the field keeps ``auto`` until it is read)."""
    recipe = dataclasses.replace(load_recipe(tiny_recipe(stages=[{"windows": 2, "steps": 2}])), from_scratch=True)
    assert recipe.student_prediction == "auto" and recipe.resolved_student_prediction == "velocity"
    train(recipe, make_setup(from_scratch_seed=1), tmp_path, progress=False)
    assert read_student_info(tmp_path)["prediction_type"] == "velocity"


def test_a_checkpoint_from_before_student_prediction_resumes_as_the_teachers_type(tmp_path):
    """Runs of earlier versions trained the teacher's type, from scratch too: their checkpoints (recipes without
    the key) resume with student_prediction: teacher, and a from-scratch one refuses the new default."""
    import json

    from proreflow.training import latest_checkpoint
    recipe = tiny_recipe(from_scratch=True, student_prediction="teacher", checkpoint_every=2,
                         stages=[{"windows": 2, "steps": 4}])
    setup = make_setup(from_scratch_seed=2)
    train(recipe, setup, tmp_path, progress=False)
    meta_path = latest_checkpoint(tmp_path) / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["recipe"]["student_prediction"]
    meta_path.write_text(json.dumps(meta))
    train(recipe, setup, tmp_path, progress=False, resume=True)  # the same recipe: accepted
    with pytest.raises(ValueError, match="student_prediction"):
        train({**recipe, "student_prediction": "auto"}, setup, tmp_path, progress=False, resume=True)
