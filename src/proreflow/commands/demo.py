"""``proreflow demo``: the whole method on built-in data, on a CPU, in minutes.

``--data mnist-t2i`` runs the Stable Diffusion path instead, on the built-in text-to-image teacher
(:mod:`proreflow.commands.demo_t2i`).

For each dataset: load (or train and cache) the epsilon-prediction teacher, distill it with a
ProReflow recipe, evaluate teacher DDIM-32 / DDIM-4 and the student at 4, 2 and 1 steps on the
same noise, and write a report folder: ``report.md`` (the table), ``results.json``, sample
grids, 2D trajectories and the loss curve.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from ..builtin import DATASETS, get_spec
from ..builtin.defaults import GUIDANCE, data_kind, default_eval_samples
from ..builtin.t2i import NAME as T2I
from ..training.recipes import budget_overrides, load_recipe
from ..windows import TimeWindows
from . import bounded_int, writable_dir

DEFAULT_DATA = ["moons", "digits"]
RECIPE = "proreflow-ii"
"""Default recipe, chosen from docs/results.md: ProReflow-II (8 -> 4 -> 2 windows, original teacher in
every stage, velocity MSE with the aligned direction term, half of each batch at its window's start, the
epsilon space's balance between windows), the best recipe studied on MNIST at 4, 2 and 1 steps at equal
optimiser steps (on digits and moons the velocity space's own balance is better at 4 steps)."""
DEMO_STEPS = {"2d": 1200, "digits": 1200, "mnist": 600}
"""Optimiser steps in all (the demo's budget), split over the recipe's stages in the proportions of its own
stage steps (ProReflow-II: a quarter, a quarter and half, :func:`~proreflow.training.recipes.budget_overrides`)."""
STUDENT_STEPS = (4, 2, 1)
TEACHER_STEPS = (32, 4)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", default=DEFAULT_DATA, choices=sorted([*DATASETS, T2I]), metavar="NAME",
                        help=f"built-in dataset(s): {', '.join(sorted(DATASETS))} (default: {' '.join(DEFAULT_DATA)}); "
                             f"{T2I}: the Stable Diffusion path on the built-in text-to-image teacher (configs/"
                             f"{T2I}.yaml through train, export and eval, as a user runs them)")
    parser.add_argument("--out", default="reports/demo",
                        help="report folder (default: reports/demo); a training run found there is resumed "
                        "(delete OUT/DATA/run to start over)")
    parser.add_argument("--recipe", default=RECIPE, help=f"preset or YAML recipe (default: {RECIPE})")
    parser.add_argument("--steps", type=bounded_int(1, 10**7), default=None,
                        help="optimiser steps in all, split over the recipe's stages in the proportions of its "
                        "own stage steps (default: per dataset, " +
                        ", ".join(f"{k} {v}" for k, v in DEMO_STEPS.items()) + ")")
    parser.add_argument("--teacher-steps", type=bounded_int(1, 10**7), default=None,
                        help="teacher training steps when no cached teacher exists (default: per dataset)")
    parser.add_argument("--samples", type=bounded_int(2, 10**6), default=None,
                        help="evaluation samples per sampler (default: 10000 for 2D data, whose distances have a "
                        "finite-sample floor of about 1/sqrt(n); 1000 for images)")
    parser.add_argument("--cache-dir", default=None, help="teacher/classifier cache (default ~/.cache/proreflow)")
    parser.add_argument("--seed", type=bounded_int(0, 2**63 - 1), default=0,
                        help="seed of the recipe and of the evaluation noise")
    parser.add_argument("--threads", type=bounded_int(1, 1024), default=None,
                        help=f"torch CPU threads (default 1 for the built-in networks, which are tiny: more threads "
                             f"only contend; every core for {T2I})")
    parser.add_argument("--allow-recipe-change", action="store_true",
                        help="resume a run in --out whose recipe differs (other --steps, --seed, ...)")
    parser.add_argument("--fid", action="store_true",
                        help=f"{T2I}: also Inception FID against the held-out images (about 0.2 s per image and row "
                             "on a CPU core; the table always has FD and accuracy of the built-in classifier)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    from ..builtin.teacher import builtin_setup
    from ..training import train
    from ..training.progressive import check_output_folder

    torch.set_num_threads(args.threads or 1)
    out = writable_dir(args.out, create=True)
    if args.cache_dir is not None:
        writable_dir(args.cache_dir, "--cache-dir")
    builtins = [data for data in args.data if data != T2I]
    recipes = {data: _recipe(data, args) for data in builtins}  # every recipe checked before any training
    if T2I in args.data:
        from .demo_t2i import t2i_recipe

        recipes[T2I] = t2i_recipe(args)
    for data, recipe in recipes.items():
        check_output_folder(recipe, out / data / "run", resume=True, allow_recipe_change=args.allow_recipe_change)
    sections, results = [], {}
    for data in builtins:
        start = time.perf_counter()
        setup = builtin_setup(data, steps=args.teacher_steps, cache_dir=args.cache_dir,
                              progress=not args.no_progress)
        steps = args.steps or DEMO_STEPS[data_kind(data)]
        recipe = recipes[data]
        # an earlier (or killed) demo run in the same folder is resumed, never deleted
        result = train(recipe, setup, out / data / "run", resume=True, progress=not args.no_progress,
                       allow_recipe_change=args.allow_recipe_change)
        rows, samples = evaluate_demo(data, setup, result, args)
        results[data] = {"recipe": recipe.name, "steps": steps, "rows": rows,
                         "stages": [s.__dict__ for s in result.stages],
                         "minutes": (time.perf_counter() - start) / 60}
        sections.append(_figures_and_table(data, out / data, rows, samples, result, setup, args))
    if T2I in args.data:
        from .demo_t2i import text_to_image_demo

        torch.set_num_threads(args.threads or os.cpu_count() or 1)
        section, results[T2I] = text_to_image_demo(args, out / T2I)
        sections.append(section)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(_report(sections, args))
    print(f"report written to {out / 'report.md'}")
    return 0


def _recipe(data: str, args: argparse.Namespace):
    kind = data_kind(data)
    budget = budget_overrides(load_recipe(args.recipe), args.steps or DEMO_STEPS[kind])
    return load_recipe(args.recipe, [*budget, f"stages.*.guidance={GUIDANCE[kind]}", f"seed={args.seed}"])


def evaluate_demo(data, setup, result, args):
    """Rows for teacher DDIM-32/4 and student 4/2/1 steps, on one fixed evaluation set."""
    from ..builtin.suite import evaluate_sampler, make_eval_set

    teacher = setup.denoiser(setup.teacher_model)
    guidance = GUIDANCE[data_kind(data)]
    samples = args.samples or default_eval_samples(data)
    evalset = make_eval_set(data, teacher, samples, guidance, args.seed, args.cache_dir,
                            progress=not args.no_progress)
    rows, samples = [], {}
    for n in TEACHER_STEPS:
        m = evaluate_sampler(evalset, teacher, TimeWindows(n), n, guidance)
        samples[f"teacher DDIM-{n}"] = m.pop("samples")
        rows.append({"sampler": f"teacher DDIM-{n}", "steps": n, **m})
    for n in STUDENT_STEPS:
        m = evaluate_sampler(evalset, result.student, result.windows.for_steps(n), n, result.guidance)
        samples[f"student {n}-step"] = m.pop("samples")
        rows.append({"sampler": f"student {n}-step", "steps": n, **m})
    samples["_evalset"] = evalset
    return rows, samples


def _figures_and_table(data, folder: Path, rows, samples, result, setup, args) -> str:
    from ..evaluation.plots import loss_curve, sample_grid, scatter_panels, trajectory_panels

    folder.mkdir(parents=True, exist_ok=True)
    evalset = samples.pop("_evalset")
    figures = []
    if get_spec(data).is_2d:
        scatter_panels(samples, evalset.real, folder / "samples.png")
        trajectory_panels(setup.denoiser(setup.teacher_model), result.student, result.windows, evalset.noise[:300],
                          folder / "trajectories.png")
        figures += ["samples.png", "trajectories.png"]
    else:
        sample_grid(samples, folder / "samples.png", per_row=20)
        figures.append("samples.png")
    loss_curve(result.history, [s.steps for s in result.stages], folder / "loss.png")
    figures.append("loss.png")
    metric_names = [k for k in rows[0] if k not in ("sampler", "steps")]
    header = "| sampler | " + " | ".join(metric_names) + " |"
    lines = [header, "|" + "---|" * (len(metric_names) + 1)]
    for r in rows:
        lines.append(f"| {r['sampler']} | " + " | ".join(_fmt(r[k]) for k in metric_names) + " |")
    budget = sum(s.teacher_evals for s in result.stages)
    stage_text = ", ".join(f"{s.windows} windows ({s.teacher} teacher) {s.steps} steps, loss {s.final_loss:.4f}, "
                           f"{s.seconds:.0f} s" for s in result.stages)
    pictures = "\n".join(f"![{f}]({data}/{f})" for f in figures)
    return (f"## {data}\n\n{get_spec(data).description}. Stages: {stage_text}. Teacher network evaluations in "
            f"training: {budget:,}. Student sampled with guidance {result.guidance}; teacher with guidance "
            f"{evalset.guidance}.\n\n" + "\n".join(lines) + "\n\n" + pictures + "\n")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _report(sections, args) -> str:
    import platform

    return ("# proreflow demo\n\n"
            f"Command: `proreflow demo --data {' '.join(args.data)}` ({args.recipe}); machine: {platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}; date {time.strftime('%Y-%m-%d')}.\n\n"
            "Metrics: `fd` Frechet distance in a trained classifier's feature space (lower is better), "
            "`accuracy` class accuracy of conditional samples, `sw` / `energy` sliced Wasserstein and energy "
            "distance to the true 2D distribution, `fidelity` RMS distance to the teacher's DDIM-32 sample from "
            "the same noise, `straightness` mean squared deviation of the trajectory from a straight line "
            "(0 = straight), `nfe` network evaluations per sample, `seconds` sampling wall time.\n\n"
            + "\n".join(sections))
