"""Step conditioning (issue 25): a student conditioned on its window count.

True answers: a conditioned copy of the teacher is the teacher at every count, bit for bit, so its step over a
window is the teacher's DDIM step; a count's offsets fold into the biases of a stock network that equals the
conditioned one (float64); a batch of mixed counts equals each count's own call row by row; a stage with extra
windows builds, for the samples of each count, exactly the batch of a stage with that count alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from proreflow.builtin.networks import MLPDenoiser, build_network, small_unet
from proreflow.parametrize import ddim_step
from proreflow.sampling import sample
from proreflow.schedules import VPSchedule, bcast
from proreflow.step_conditioning import (
    attach_step_conditioning,
    conditioned_denoiser,
    fold_step_count,
    time_embedding_layers,
)
from proreflow.targets import StageTeacher, make_mixed_reflow_batch, make_reflow_batch
from proreflow.teachers import Denoiser, diffusers_network
from proreflow.training.batches import window_counts
from proreflow.training.recipes import RecipeError, load_recipe
from proreflow.training.setup import call_module
from proreflow.windows import TimeWindows

SCHEDULE = VPSchedule.from_betas()
COUNTS = (4, 2, 1)


def mlp() -> MLPDenoiser:
    torch.manual_seed(0)
    net = MLPDenoiser((2,), num_classes=3, width=32, depth=2)
    torch.nn.init.normal_(net.out[-1].weight, std=0.1)  # a network that is not zero at the output
    return net


def unet():
    torch.manual_seed(0)
    return build_network(small_unet(3, sample_size=8, block_out_channels=(8, 16)))


def cond_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                attention_head_dim=2)


CASES = {  # network, adapter, input shape, a condition of batch 3
    "mlp": (mlp, call_module, (2,), torch.tensor([0, 1, 2])),
    "UNet2DModel": (unet, diffusers_network, (1, 8, 8), torch.tensor([0, 1, 2])),
    "UNet2DConditionModel": (cond_unet, diffusers_network, (4, 8, 8), torch.randn(3, 5, 8)),
}


def denoisers(name: str, randomize: bool = False):
    """(teacher, conditioned student) Denoisers over the network of ``name``; ``randomize``: nonzero offsets."""
    build, adapter, shape, cond = CASES[name]
    teacher = build().eval()
    module = copy.deepcopy(teacher)
    conditioning = attach_step_conditioning(module, COUNTS)
    if randomize:
        with torch.no_grad():
            for offsets in conditioning.offsets:
                offsets.normal_(generator=torch.Generator().manual_seed(1))
    student = conditioned_denoiser(Denoiser(adapter(module), "epsilon", SCHEDULE), module)
    return Denoiser(adapter(teacher), "epsilon", SCHEDULE), student, module, shape, cond


@pytest.mark.parametrize("name", list(CASES))
def test_a_conditioned_copy_is_the_teacher_at_every_count(name):
    """Zero offsets: the student's velocity over any window is the teacher's, bit for bit: its DDIM step."""
    teacher, student, _, shape, cond = denoisers(name)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1.0, 0.7, 0.3])
    assert student.step_counts == COUNTS
    for k in COUNTS:
        t_end = TimeWindows(k).bounds(t)[1]
        v = student.at_windows(k).velocity(x, t, t_end, cond)
        eps = teacher.predict(x, t, cond)
        abar, abar_end = SCHEDULE.abar(t), SCHEDULE.abar(t_end)
        x0 = (x - bcast((1 - abar).sqrt(), x) * eps) / bcast(abar.sqrt(), x)
        want = ddim_step(x0, eps, bcast(abar_end, x))
        torch.testing.assert_close(v, teacher.velocity(x, t, t_end, cond), rtol=0, atol=0)
        torch.testing.assert_close(x + bcast(t_end - t, x) * v, want, rtol=1e-6, atol=1e-6)  # float32 rounding


@pytest.mark.parametrize("name", list(CASES))
def test_a_folded_count_is_a_stock_network_equal_to_the_conditioned_one(name):
    build, adapter, shape, cond = CASES[name]
    _, student, module, shape, cond = denoisers(name, randomize=True)
    module.double()
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cond = cond.double() if cond.is_floating_point() else cond
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    outputs = []
    for k in COUNTS:
        plain = build().double().eval()  # a stock network: no step_conditioning attribute, no hooks
        state = fold_step_count(module.state_dict(), COUNTS, time_embedding_layers(plain), k)
        plain.load_state_dict(state)  # strict: exactly the stock network's keys
        want = student.at_windows(k).predict(x, t, cond)
        got = Denoiser(adapter(plain), "epsilon", SCHEDULE).predict(x, t, cond)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        outputs.append(want)
    assert not torch.allclose(outputs[0], outputs[2])  # the counts are different functions


@pytest.mark.parametrize("name", ["mlp", "UNet2DConditionModel"])
def test_a_batch_of_mixed_counts_equals_each_count_alone_and_guidance_keeps_rows(name):
    _, student, _, shape, cond = denoisers(name, randomize=True)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.9, 0.6, 0.2])
    counts = torch.tensor([1, 4, 2])
    mixed = student.at_windows(counts).predict(x, t, cond)
    for i, k in enumerate(counts.tolist()):
        alone = student.at_windows(k).predict(x[i:i + 1], t[i:i + 1], cond[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-6)
    uncond = torch.zeros_like(cond[:1]) if cond.is_floating_point() else torch.tensor([3])
    guided = student.at_windows(counts).predict(x, t, cond, uncond, guidance=3.0)
    for i, k in enumerate(counts.tolist()):
        alone = student.at_windows(k).predict(x[i:i + 1], t[i:i + 1], cond[i:i + 1], uncond, guidance=3.0)
        torch.testing.assert_close(guided[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_a_copy_of_a_conditioned_network_uses_its_own_offsets():
    _, _, module, _, _ = denoisers("mlp", randomize=True)
    twin = copy.deepcopy(module)
    with torch.no_grad():
        for offsets in twin.step_conditioning.offsets:
            offsets.zero_()
    plain = mlp().eval()
    x, t, cond = torch.randn(3, 2), torch.full((3,), 500.0), torch.tensor([0, 1, 2])
    with twin.step_conditioning.bound(1):
        torch.testing.assert_close(twin(x, t, cond), plain(x, t, cond), rtol=0, atol=0)
    with module.step_conditioning.bound(1):
        assert not torch.allclose(module(x, t, cond), plain(x, t, cond))


def test_an_unbound_or_unserved_count_is_refused():
    _, student, _, shape, cond = denoisers("mlp")
    x, t = torch.randn(3, *shape), torch.full((3,), 0.5)
    with pytest.raises(ValueError, match="at_windows"):
        student.predict(x, t, cond)
    with pytest.raises(ValueError, match="serves 4/2/1 windows, not 3"):
        student.at_windows(3)
    with pytest.raises(ValueError, match="serves 4/2/1 windows, not \\[8\\]"):
        student.at_windows(torch.tensor([8, 4, 4])).predict(x, t, cond)
    with pytest.raises(ValueError, match="serves 4/2/1 windows"):
        sample(student, x, TimeWindows(3), 3, cond)  # sampling binds the windows it walks
    with pytest.raises(ValueError, match="no time embedding"):
        attach_step_conditioning(torch.nn.Linear(2, 2), COUNTS)


def mixed_inputs(shape: tuple[int, ...], n: int = 12):
    """Data, noise, times, labels and window counts (4, 2, 1 in turn) of a mixed batch of ``n`` samples."""
    g = torch.Generator().manual_seed(5)
    x0, noise, t = torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g), torch.rand(n, generator=g)
    return x0, noise, t, torch.arange(n) % 3, torch.tensor([4, 2, 1] * (n // 3))


def test_mixed_batch_rows_equal_the_batch_of_their_count_alone():
    """Each count's samples get make_reflow_batch's batch for TimeWindows(k), crossed in steps * W / k steps."""
    teacher, _, _, shape, cond = denoisers("mlp")
    x0, noise, t, labels, counts = mixed_inputs(shape)
    stage_teacher = StageTeacher(teacher, steps=2)
    mixed = make_mixed_reflow_batch(x0, noise, counts, TimeWindows(4), stage_teacher, SCHEDULE, labels, None, t)
    for k in COUNTS:
        rows = counts == k
        alone = make_reflow_batch(x0[rows], noise[rows], TimeWindows(k), StageTeacher(teacher, steps=2 * 4 // k),
                                  SCHEDULE, labels[rows], None, t=t[rows])
        for field in ("x_t", "t", "v_target", "t_start", "t_end"):
            torch.testing.assert_close(getattr(mixed, field)[rows], getattr(alone, field), rtol=0, atol=0)
        assert torch.allclose(mixed.t_start[rows] - mixed.t_end[rows], torch.tensor(1 / k))


def test_an_extra_teacher_crosses_the_smaller_counts_and_the_stage_teacher_its_own():
    """extra_teacher: the rows of counts below the stage's are make_reflow_batch's batch of that teacher (its own
    steps per window of the stage, times W / k), the stage's own count keeps the stage teacher's, row for row."""
    teacher, student, _, shape, cond = denoisers("mlp", randomize=True)
    x0, noise, t, labels, counts = mixed_inputs(shape)
    stage_teacher = StageTeacher(teacher, steps=2)
    previous = StageTeacher(student, steps=1, windows=TimeWindows(4))  # a piecewise-straight 4-window student
    mixed = make_mixed_reflow_batch(x0, noise, counts, TimeWindows(4), stage_teacher, SCHEDULE, labels, None, t,
                                    extra_teacher=previous)
    for k, crossing in ((4, StageTeacher(teacher, steps=2)), (2, StageTeacher(student, 2, TimeWindows(4))),
                        (1, StageTeacher(student, 4, TimeWindows(4)))):
        rows = counts == k
        alone = make_reflow_batch(x0[rows], noise[rows], TimeWindows(k), crossing, SCHEDULE, labels[rows], None,
                                  t=t[rows])
        for field in ("x_t", "t", "v_target", "t_start", "t_end"):
            torch.testing.assert_close(getattr(mixed, field)[rows], getattr(alone, field), rtol=0, atol=0)
    rows = counts == 1  # the student's 4 steps are not the teacher's 8 (its offsets differ)
    assert not torch.allclose(mixed.v_target[rows], make_reflow_batch(
        x0[rows], noise[rows], TimeWindows(1), StageTeacher(teacher, steps=8), SCHEDULE, labels[rows], None,
        t=t[rows]).v_target, atol=1e-3)


def test_window_draws_depend_on_the_position_only_and_are_even():
    whole = window_counts(range(0, 3000), seed=7, stage=2, choices=(4, 2, 1))
    parts = torch.cat([window_counts(range(a, a + 500), 7, 2, (4, 2, 1)) for a in range(0, 3000, 500)])
    assert torch.equal(whole, parts)
    shares = torch.stack([(whole == k).double().mean() for k in COUNTS])
    assert torch.all((shares - 1 / 3).abs() < 0.03)  # 3 sigma of a binomial share at n = 3000 is 0.026
    assert torch.equal(window_counts(range(5), 7, 2, (4,)), torch.full((5,), 4))


def test_recipe_keys_of_the_any_step_student():
    recipe = load_recipe("proreflow-ii", ["stages.2.windows=4", "stages.2.extra_windows=[2, 1]",
                                          "step_conditioning=true"])
    assert recipe.step_counts == (8, 4, 2, 1) and recipe.stages[2].extra_windows == [2, 1]
    assert load_recipe("proreflow-ii", ["stages.2.extra_windows=[1]"]).step_counts == ()  # mixing, unconditioned
    extra = load_recipe("proreflow-ii", ["stages.2.extra_windows=[1]", "stages.2.extra_teacher=previous"]).stages[2]
    assert extra.uses_previous and extra.teacher == "original" and extra.solver_steps == 16  # the original's steps
    for bad, message in ((["stages.2.extra_windows=[3]"], "do not nest in the stage's 2"),
                         (["stages.2.extra_windows=[1, 1]"], "repeats a count"),
                         (["stages.2.extra_windows=[2]"], "repeats a count"),
                         (["stages.2.extra_windows=1"], "expected a list"),
                         (["stages.2.extra_windows=[0]"], "must be at least 1"),
                         (["stages.*.start_points=teacher", "stages.2.extra_windows=[1]"], "start_points: teacher"),
                         (["stages.2.extra_teacher=previous"], "this stage has none"),
                         (["stages.0.extra_windows=[4]", "stages.0.extra_teacher=previous"],
                          "stages.0.extra_teacher: the first stage has no previous student"),
                         (["stages.2.extra_windows=[1]", "stages.2.extra_teacher=student"], "extra_teacher")):
        with pytest.raises(RecipeError, match=message):
            load_recipe("proreflow-ii", bad)


def test_start_epsilon_weighs_every_count_on_the_stage_scale():
    """In a stage with extra windows each window's weight is c(h, 0)^2 / c(t_start, t_end)^2 with h the stage's own
    window length; for the stage's own count that is today's weight (the sample's window length)."""
    from proreflow.losses import time_weights, velocity_per_epsilon

    t_start = torch.tensor([1.0, 0.5, 1.0, 0.25], dtype=torch.float64)
    t_end = torch.tensor([0.0, 0.0, 0.75, 0.0], dtype=torch.float64)
    t, target = (t_start + t_end) / 2, torch.ones(4, 3, dtype=torch.float64)
    weights = time_weights("start_epsilon", t, t_start, t_end, target, SCHEDULE, reference=0.25)
    c = velocity_per_epsilon(t_start, t_end, SCHEDULE)
    c_ref = velocity_per_epsilon(torch.tensor(0.25, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64),
                                 SCHEDULE)
    torch.testing.assert_close(weights, (c_ref / c) ** 2)
    own = time_weights("start_epsilon", t, t_start, t_end, target, SCHEDULE)
    torch.testing.assert_close(weights[2:], own[2:])  # the 4-window samples: the weights of a 4-window stage
    assert weights[3] == 1.0 and weights[0] < 0.05 < own[0] == 1.0  # a 1-window sample: 1 on its own scale
