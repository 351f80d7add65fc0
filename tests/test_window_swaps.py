"""Window swaps (``proreflow.builtin.window_swaps``, the quality benchmark's ``--swap``) on the exact Gaussian
teacher."""

from types import SimpleNamespace

import torch
from helpers.gaussian import gaussian_teacher

import proreflow.builtin.window_swaps as swapping
from proreflow import VPSchedule
from proreflow.builtin.suite import EvalSet
from proreflow.solvers import solve
from proreflow.training.recipes import load_recipe
from proreflow.windows import TimeWindows


def test_window_swaps_compose_the_crossings_they_name(monkeypatch):
    """Each row's sampler is the crossings it names, window by window: a student that is the teacher's weights
    equals the `initial` source, and a second method with the same student equals the first, so those rows
    repeat the unswapped samples exactly; the teacher in window 0 is its own solve (the stage's solver steps)
    followed by the student. The samples are captured in place of the metrics."""
    monkeypatch.setattr(swapping, "evaluate_callable",
                        lambda evalset, sampler, nfe: {"x": sampler(evalset.noise, evalset.cond), "nfe": nfe,
                                                       "samples": None})
    schedule = VPSchedule.from_betas()
    mu = torch.tensor([0.5, -1.0], dtype=torch.float64)
    teacher = gaussian_teacher(schedule, mu, 0.3)
    recipe = load_recipe("proreflow-ii", ["stages.*.guidance=1.0", "stages.*.solver_steps=4"])
    windows = TimeWindows(recipe.stages[-1].windows)
    student = SimpleNamespace(student=teacher, guidance=1.0, windows=windows)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    evalset = EvalSet("moons", noise, None, None, 1.0, noise, noise)

    rows = swapping.window_swaps({"a": student, "b": student}, teacher, recipe, evalset)
    by = {(r["method"], r["window"], r["source"], r["steps"]): r for r in rows}
    assert {r["steps"] for r in rows} == {2, 4}  # the step counts the 2 windows divide
    for steps in (2, 4):
        k = steps // 2
        plain = by["a", -1, "a", steps]["x"]
        assert torch.equal(plain, solve(teacher, noise, 1.0, 0.0, steps, windows=windows))
        assert torch.equal(by["b", -1, "b", steps]["x"], plain)
        for w in (0, 1):
            for source in ("b", "initial"):
                assert torch.equal(by["a", w, source, steps]["x"], plain)
        landed = solve(teacher, noise, 1.0, 0.5, 4)
        assert torch.equal(by["a", 0, "teacher", steps]["x"], solve(teacher, landed, 0.5, 0.0, k, windows=windows))
        assert not torch.equal(by["a", 0, "teacher", steps]["x"], plain)
        assert by["a", 0, "teacher", steps]["nfe"] == 4 + k
        assert by["a", 0, "teacher", steps]["plan"] == ["teacher", "a"]
        assert by["b", 1, "initial", steps]["plan"] == ["b", "initial"]
