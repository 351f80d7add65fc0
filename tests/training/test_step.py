"""Stage teachers: what they solve and how many network evaluations that costs."""

from __future__ import annotations

import torch
from helpers.engine_toys import CLASSES, MLP, make_setup

from proreflow import TimeWindows
from proreflow.targets import make_reflow_batch
from proreflow.training.recipes import load_recipe
from proreflow.training.step import build_stage_teacher

EDGES4 = [1.0, 0.75, 0.5, 0.25, 0.0]


def test_previous_student_teacher_takes_one_euler_step_per_old_window():
    """Stage 4 -> 2 windows: x_end = two Euler steps of the previous student, one per old window."""
    setup = make_setup()
    recipe = load_recipe({"stages": [{"windows": 4}, {"windows": 2, "teacher": "previous"}]})
    previous = MLP(seed=5)
    teacher, counter = build_stage_teacher(setup, recipe, 1, setup.teacher_model, previous)
    assert teacher.steps == 2 and teacher.windows.count == 4 and teacher.guidance == 1.0
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([1.0, 0.9, 0.6, 0.5, 0.3, 0.01], dtype=torch.float64)
    cond = torch.tensor([0, 1, 2, 0, 1, 2])
    batch = make_reflow_batch(x0, noise, teacher.windows.merge(), teacher, setup.schedule, cond, t=t)
    assert counter.take() == 6 * 2  # one evaluation per sample per old window

    student = setup.denoiser(previous)
    for i in range(6):
        t_start, t_end = float(batch.t_start[i]), float(batch.t_end[i])
        x = setup.schedule.add_noise(x0[i:i + 1], noise[i:i + 1], torch.tensor([t_start], dtype=torch.float64))
        start = x
        for a, b in zip(EDGES4[:-1], EDGES4[1:]):
            if t_start >= a > t_end:  # old windows inside the new one
                ta, tb = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
                x = x + (b - a) * student.velocity(x, ta, tb, cond[i:i + 1])
        v = (x - start) / (t_end - t_start)
        torch.testing.assert_close(batch.v_target[i:i + 1], v, rtol=1e-12, atol=1e-12)


def test_original_teacher_counts_guided_evaluations():
    """Baked guidance: S DDIM steps per window, each a conditional and an unconditional evaluation."""
    setup = make_setup()
    recipe = load_recipe({"defaults": {"guidance": 3.0, "solver_steps": 5}, "stages": [{"windows": 4}]})
    teacher, counter = build_stage_teacher(setup, recipe, 0, setup.teacher_model, None)
    assert teacher.guidance == 3.0 and teacher.windows is None
    x0 = torch.zeros(7, 2, dtype=torch.float64)
    make_reflow_batch(x0, torch.randn_like(x0), TimeWindows(4), teacher, setup.schedule,
                      torch.zeros(7, dtype=torch.long), setup.uncond)
    assert counter.take() == 7 * 5 * 2 and counter.take() == 0


def test_cfg_sync_teacher_is_unguided():
    setup = make_setup()
    recipe = load_recipe({"defaults": {"guidance": 3.0, "guidance_mode": "cfg_sync", "cond_dropout": 0.1},
                          "stages": [{"windows": 2}]})
    teacher, _ = build_stage_teacher(setup, recipe, 0, setup.teacher_model, None)
    assert teacher.guidance == 1.0
    assert setup.uncond.item() == CLASSES


def test_stage_loss_space_matches_epsilon_noise_matching_and_velocity_default():
    """loss_space epsilon: the squared error is between the student's epsilon output and the epsilon
    whose DDIM step lands on the target (PeRFlow's noise matching); velocity: the plain velocity MSE."""
    from proreflow.losses import aligned_v_loss, time_weights
    from proreflow.parametrize import output_to_velocity, velocity_to_output
    from proreflow.schedules import VPSchedule
    from proreflow.targets import ReflowBatch
    from proreflow.training.step import stage_loss

    g = torch.Generator().manual_seed(0)
    sched = VPSchedule.from_betas("scaled_linear")
    t = torch.tensor([0.9, 0.6, 0.3, 0.05], dtype=torch.float64)
    t_start, t_end = TimeWindows(2).bounds(t)
    x_t, eps, v_tgt = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    v_pred = output_to_velocity(eps, x_t, t, t_end, "epsilon", sched)
    batch = ReflowBatch(x_t=x_t, t=t, v_target=v_tgt, t_start=t_start, t_end=t_end)
    eps_tgt = velocity_to_output(v_tgt, x_t, t, t_end, "epsilon", sched)
    recipe = load_recipe("proreflow-ii", ["stages.*.loss_space=epsilon", "stages.*.loss_weighting=none",
                                          "stages.*.alpha=0.5"])
    terms = stage_loss(recipe.stages[0], batch, v_pred, sched)
    assert abs(terms.mse.item() - (eps - eps_tgt).pow(2).mean().item()) < 1e-12
    assert abs(terms.direction.item() - aligned_v_loss(v_pred, v_tgt).direction.item()) < 1e-12
    plain = stage_loss(load_recipe("proreflow-ii", ["stages.*.loss_weighting=none"]).stages[0], batch, v_pred, sched)
    assert abs(plain.total.item() - aligned_v_loss(v_pred, v_tgt, 1.0).total.item()) < 1e-12
    # the preset's own weighting (start_epsilon): velocity MSE weighted by c(h, 0)^2 / c(t_start, t_end)^2
    preset = load_recipe("proreflow-ii").stages[0]
    assert (preset.loss_space, preset.loss_weighting) == ("velocity", "start_epsilon")
    w = time_weights("start_epsilon", t, t_start, t_end, v_tgt, sched)
    assert (w[t_end == 0] == 1).all() and (w[t_end > 0] < 1).all()
    per = (v_pred - v_tgt).pow(2).flatten(1).mean(1)
    assert abs(stage_loss(preset, batch, v_pred, sched).mse.item() - (w * per).mean().item()) < 1e-12
