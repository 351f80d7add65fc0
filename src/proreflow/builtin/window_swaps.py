"""Window swaps: which window's crossing sets a student's sample quality.

A student of ``W`` windows crosses ``[0, 1]`` window by window; a swap replaces its crossing of one window with
another source's (another student's, the teacher's solve, or the initialisation's DDIM steps) and scores the
samples. The window whose swap moves the metric most is the one that limits the student (the quality
benchmark's ``--swap``, ``docs/research/2026-quality-study.md``).
"""

from __future__ import annotations

import torch

from ..solvers import EVALS_PER_STEP, solve
from ..windows import TimeWindows
from .suite import EvalSet, evaluate_callable

SWAP_SOURCES = ("teacher", "initial")
"""What :func:`window_swaps` puts in a window besides the other methods' students: the last stage's teacher (its
solver and steps, the stage's guidance) and the initialisation (the teacher's weights as a student: DDIM steps
to the window's end)."""


@torch.no_grad()
def window_swaps(results: dict[str, object], teacher, recipe, evalset: EvalSet,
                 step_counts: tuple[int, ...] = (4, 2, 1)) -> list[dict]:
    """Which window's crossing sets a sample's quality: each method's student sampled with the crossing of one
    window of its last stage taken from another source (another method's student, :data:`SWAP_SOURCES`), at
    every step count of ``step_counts`` that the windows divide. ``results``: method name -> a trained run (its
    ``student``, ``guidance``). Rows: ``method`` (the student),
    ``window`` (-1: none swapped), ``source``, ``plan`` (the source of each window), ``steps`` and the metrics.
    All methods share the last stage's windows and solver (the benchmark checks it); the teacher and the
    initialisation are guided as the evaluation's reference is (``evalset.guidance``). Each distinct plan is
    sampled once, and each source's crossing of window 0 once per step count it depends on."""
    stage = recipe.stages[-1]
    windows = TimeWindows(stage.windows)
    edges = windows.edges(torch.float64).tolist()
    guided = evalset.uncond is not None
    teacher_g = evalset.guidance

    def student(result):
        def cross(x, t0, t1, k, cond):
            return solve(result.student, x, t0, t1, k, cond, evalset.uncond, result.guidance, windows=windows)
        return cross, lambda k: k * (2 if guided and result.guidance != 1 else 1)

    def solve_teacher(x, t0, t1, k, cond):
        return solve(teacher, x, t0, t1, stage.solver_steps, cond, evalset.uncond, teacher_g, solver=stage.solver)

    def initial(x, t0, t1, k, cond):
        return solve(teacher, x, t0, t1, k, cond, evalset.uncond, teacher_g, windows=windows)

    per_eval = 2 if guided and teacher_g != 1 else 1
    sources = {name: student(result) for name, result in results.items()}
    sources["teacher"] = (solve_teacher, lambda k: stage.solver_steps * EVALS_PER_STEP[stage.solver] * per_eval)
    sources["initial"] = (initial, lambda k: k * per_eval)
    first_window: dict[tuple, torch.Tensor] = {}  # a source's crossing of window 0 starts from the same noise
    measured: dict[tuple, dict] = {}  # (plan, k) -> metrics: a plan reached from two methods is sampled once
    rows = []
    for steps in (n for n in step_counts if n % windows.count == 0):
        k = steps // windows.count
        for method in results:
            swaps = [(-1, method)] + [(w, s) for w in range(windows.count) for s in sources if s != method]
            for w, source in swaps:
                plan = [source if i == w else method for i in range(windows.count)]

                def sampler(noise, cond, plan=plan, k=k):
                    x = noise
                    for i, name in enumerate(plan):
                        key = (name, None if name == "teacher" else k)  # the teacher's solve does not use k
                        if i == 0 and key in first_window:
                            x = first_window[key]
                            continue
                        x = sources[name][0](x, edges[i], edges[i + 1], k, cond)
                        if i == 0:
                            first_window[key] = x
                    return x

                if (tuple(plan), k) not in measured:
                    m = evaluate_callable(evalset, sampler, nfe=sum(sources[name][1](k) for name in plan))
                    m.pop("samples")
                    measured[tuple(plan), k] = m
                m = measured[tuple(plan), k]
                rows.append({"method": method, "window": w, "source": source, "plan": plan, "steps": steps, **m})
    return rows
