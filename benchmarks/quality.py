"""Quality benchmark: ProReflow against its baselines on the same teacher and training budget.

    python benchmarks/quality.py --quick              # one seed, digits, reduced steps (< 10 min on 2 cores)
    python benchmarks/quality.py                      # the full table: 3 seeds, moons + digits + mnist

For each dataset: training-free anchors (teacher DDIM at 32/8/4/2/1 steps, DPM-Solver++ 2M at
4 and 2 steps; with ``--teacher flow`` the flow-matching teacher's Euler at 32/8/4/2/1 steps, and no
DPM-Solver++, which needs a VP teacher) and distilled students (2-Reflow, PeRFlow, ProReflow-I/II/1step, ablations),
every student trained for the same number of optimiser steps from the teacher's weights (the
"from scratch" methods: from a fresh network of the teacher's architecture); the
teacher network evaluations each method spent are counted and reported. Every sampler is
scored on the same noise and conditions (``proreflow.builtin.suite``), and every student's
last-stage windows are diagnosed (:func:`window_diagnostics`); with ``--swap`` each student is also sampled with
one window's crossing taken from another method's student, the teacher or the initialisation
(:func:`window_swaps`: which window sets the metric). Writes ``docs/results.json`` (and
``docs/quality_vs_budget.png``, ``docs/results-windows.png``) and its tables to
``docs/research/quality-tables.md`` (``docs/results.md`` is the hand-written results page that cites
them); with ``--out DIR`` all of them go to ``DIR`` (the tables as ``DIR/results.md``), or the tables to
``--tables PATH``.

Cost savers, neither of which changes a number: the evaluation set and the training-free
anchors are cached per teacher and seed under ``--work/evalsets``; the original teacher's
reflow batches under ``--work/targets`` (recipe ``target_cache``), shared by methods that
differ only in loss or optimiser settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import diffusers
import torch

from proreflow.builtin import load_dataset
from proreflow.builtin.baselines import dpm_solver_sample
from proreflow.builtin.defaults import GUIDANCE, data_kind, default_eval_samples
from proreflow.builtin.suite import evaluate_callable, evaluate_sampler, make_eval_set
from proreflow.builtin.teacher import SAMPLER_NAMES, TEACHER_KINDS, builtin_setup, teacher_config
from proreflow.builtin.window_swaps import SWAP_SOURCES, window_swaps
from proreflow.files import atomic_write
from proreflow.schedules import VP_TIME_CONVENTION
from proreflow.targets import StageTeacher, make_reflow_batch
from proreflow.training import train
from proreflow.training.recipes import load_recipe, split_steps
from proreflow.windows import TimeWindows

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / "docs" / "research" / "quality-tables.md"
"""Where a run with the default ``--out`` (``docs/``) writes its markdown tables: ``docs/results.md`` is the
results page for users, written by hand from them."""

_BALANCE = ("stages.*.loss_space=velocity", "stages.*.loss_weighting=start_epsilon", "stages.*.start_share=0.5")
"""Round 5's default: velocity MSE with the epsilon space's balance between windows, half at window starts."""
_CFG_SYNC = ("stages.*.guidance_mode=cfg_sync", "stages.*.cond_dropout=0.1")
"""PeRFlow's guidance scheme: unguided targets, condition dropout, the student sampled with guidance."""
ANY_STEP = ("ProReflow any-step: last stage 4, 2 and 1 windows on the epsilon space's scale, step-conditioned, last "
            "stage half the budget")
_ANY_STEP = ("stages.2.windows=4", "stages.2.extra_windows=[2, 1]", "step_conditioning=true")
"""Issue 25's any-step student: the last stage at 4 windows trains 4-, 2- and 1-window targets, conditioned on the
count."""

# name -> (preset, overrides): every method trains for TOTAL optimiser steps, split evenly over its stages.
METHODS = {
    "2-Reflow": ("reflow", []),
    "PeRFlow": ("perflow", []),
    "ProReflow-I": ("proreflow-i", []),
    "ProReflow-II": ("proreflow-ii", []),
    "ProReflow-1step": ("proreflow-1step", []),
    "PeRFlow + aligned v (no progressive)": ("perflow", ["stages.*.alpha=1.0"]),
    "ProReflow-I, MSE (no aligned v)": ("proreflow-i", ["stages.*.alpha=0.0"]),
    "2 windows + aligned v, one stage (ProReflow-II without progressive)": (
        "perflow", ["stages.0.windows=2", "stages.0.solver_steps=16", "stages.*.alpha=1.0"]),
    "ProReflow-I, previous student as stage teacher": ("proreflow-i", ["stages.1.teacher=previous"]),
    "ProReflow-II, previous student as stage teacher": ("proreflow-ii", ["stages.1.teacher=previous",
                                                                         "stages.2.teacher=previous"]),
    # loss-space study (issue 13): each changes one thing against the preset
    "ProReflow-II, velocity MSE": ("proreflow-ii", ["stages.*.loss_space=velocity"]),
    "ProReflow-II, epsilon-space MSE": ("proreflow-ii", ["stages.*.loss_space=epsilon"]),
    "ProReflow-II, x0-space MSE": ("proreflow-ii", ["stages.*.loss_space=x0"]),
    "ProReflow-II, geometric velocity-epsilon MSE": ("proreflow-ii", ["stages.*.loss_space=geometric"]),
    "PeRFlow, geometric velocity-epsilon MSE": ("perflow", ["stages.*.loss_space=geometric"]),
    "ProReflow-II, epsilon-space MSE + min-SNR-5": ("proreflow-ii", ["stages.*.loss_space=epsilon",
                                                                     "stages.*.loss_weighting=min_snr"]),
    "ProReflow-II, window-normalised velocity MSE": ("proreflow-ii", ["stages.*.loss_space=velocity",
                                                                      "stages.*.loss_weighting=window"]),
    "ProReflow-II, epsilon-space MSE, warm-up 10 steps": ("proreflow-ii", ["stages.*.loss_space=epsilon",
                                                                           "stages.*.warmup_steps=10"]),
    "ProReflow-II, epsilon-space MSE, lr 3e-4": ("proreflow-ii", ["stages.*.loss_space=epsilon", "stages.*.lr=3e-4"]),
    "ProReflow-II, velocity MSE, half at window starts": ("proreflow-ii", ["stages.*.loss_space=velocity",
                                                                           "stages.*.start_share=0.5"]),
    "ProReflow-II, epsilon-space MSE, half at window starts": ("proreflow-ii", ["stages.*.loss_space=epsilon",
                                                                                "stages.*.start_share=0.5"]),
    "ProReflow-II, geometric velocity-epsilon MSE, half at window starts": (
        "proreflow-ii", ["stages.*.loss_space=geometric", "stages.*.start_share=0.5"]),
    "ProReflow-II, velocity MSE then epsilon-space in the last stage, half at window starts": (
        "proreflow-ii", ["stages.*.loss_space=velocity", "stages.2.loss_space=epsilon", "stages.*.start_share=0.5"]),
    "ProReflow-II, epsilon space capped at c = 4, half at window starts": (
        "proreflow-ii", ["stages.*.loss_space=capped_epsilon", "stages.*.c_cap=4.0", "stages.*.start_share=0.5"]),
    "ProReflow-II, epsilon-space MSE, quarter at window starts": ("proreflow-ii", ["stages.*.loss_space=epsilon",
                                                                                   "stages.*.start_share=0.25"]),
    "ProReflow-II, epsilon-space MSE, all at window starts": ("proreflow-ii", ["stages.*.loss_space=epsilon",
                                                                               "stages.*.start_share=1.0"]),
    "PeRFlow, velocity MSE": ("perflow", ["stages.*.loss_space=velocity"]),
    "PeRFlow, epsilon-space MSE": ("perflow", ["stages.*.loss_space=epsilon"]),
    # optimiser schedule relative to stage length (issue 13): the default with one change each
    "ProReflow-II, velocity MSE, half at window starts, warm-up 10 steps": (
        "proreflow-ii", ["stages.*.loss_space=velocity", "stages.*.start_share=0.5", "stages.*.warmup_steps=10"]),
    "ProReflow-II, velocity MSE, half at window starts, lr 3e-4": (
        "proreflow-ii", ["stages.*.loss_space=velocity", "stages.*.start_share=0.5", "stages.*.lr=3e-4"]),
    "ProReflow-II, velocity MSE, half at window starts, EMA off": (
        "proreflow-ii", ["stages.*.loss_space=velocity", "stages.*.start_share=0.5", "stages.*.ema_decay=0.0"]),
    # the budget's split over stages (issue 13): the last stage's student is the one sampled
    "ProReflow-II, velocity MSE, half at window starts, last stage half the budget": (
        "proreflow-ii", ["stages.*.loss_space=velocity", "stages.*.start_share=0.5"]),
    "ProReflow-II, epsilon-space MSE, half at window starts, last stage half the budget": (
        "proreflow-ii", ["stages.*.loss_space=epsilon", "stages.*.start_share=0.5"]),
    # what the epsilon space changes (issue 13 round 5): the balance between windows (start_epsilon) and the squared
    # error's scale against the direction term (alpha)
    "ProReflow-II, velocity MSE with the epsilon space's balance between windows relative to the last, "
    "last stage half the budget, alpha 3": (
        "proreflow-ii", [*_BALANCE, "stages.*.alpha=3.0"]),
    "ProReflow-II, velocity MSE with the epsilon space's balance between windows relative to the last, "
    "last stage half the budget, alpha 10": (
        "proreflow-ii", [*_BALANCE, "stages.*.alpha=10.0"]),
    # round 6: which stages the balance acts in
    "ProReflow-II, the epsilon space's balance in the last stage only, last stage half the budget": (
        "proreflow-ii", [*_BALANCE, "stages.0.loss_weighting=none", "stages.1.loss_weighting=none"]),
    "ProReflow-II, the epsilon space's balance before the last stage only, last stage half the budget": (
        "proreflow-ii", [*_BALANCE, "stages.2.loss_weighting=none"]),
    "ProReflow-II, velocity MSE, half at window starts, last stage half the budget, alpha 10": (
        "proreflow-ii", ["stages.*.loss_space=velocity", "stages.*.start_share=0.5", "stages.*.alpha=10.0"]),
    "ProReflow-II, velocity MSE, half at window starts, last stage half the budget, alpha 100": (
        "proreflow-ii", ["stages.*.loss_space=velocity", "stages.*.start_share=0.5", "stages.*.alpha=100.0"]),
    "ProReflow-II, velocity MSE, half at window starts, last stage half the budget, magnitude term 1": (
        "proreflow-ii", ["stages.*.loss_space=velocity", "stages.*.start_share=0.5", "stages.*.beta=1.0"]),
    "ProReflow-1step, half at window starts": ("proreflow-1step", ["stages.*.start_share=0.5"]),
    "ProReflow-1step, half at window starts, last stage half the budget": (
        "proreflow-1step", ["stages.*.start_share=0.5"]),
    "ProReflow-1step, epsilon space's balance between windows, last stage half the budget": (
        "proreflow-1step", ["stages.*.start_share=0.5", "stages.*.loss_weighting=start_epsilon"]),
    # the teacher's solve (issues 13, 16): evaluations per window against the default's 32 // windows DDIM steps
    "ProReflow-II, velocity MSE, half at window starts, DDIM at half the steps": (
        "proreflow-ii", ["stages.*.loss_space=velocity", "stages.*.start_share=0.5", "stages.0.solver_steps=2",
                         "stages.1.solver_steps=4", "stages.2.solver_steps=8"]),
    "ProReflow-II, velocity MSE, half at window starts, DPM-Solver++(2M) at half the steps": (
        "proreflow-ii", ["stages.*.loss_space=velocity", "stages.*.start_share=0.5", "stages.*.solver=dpmpp_2m",
                         "stages.0.solver_steps=2", "stages.1.solver_steps=4", "stages.2.solver_steps=8"]),
    "ProReflow-II, velocity MSE, half at window starts, DPM-Solver++(2M) 3 / 3 / 4 steps": (
        "proreflow-ii", ["stages.*.loss_space=velocity", "stages.*.start_share=0.5", "stages.*.solver=dpmpp_2m",
                         "stages.0.solver_steps=3", "stages.1.solver_steps=3", "stages.2.solver_steps=4"]),
    "ProReflow-II, velocity MSE, half at window starts, DDIM at twice the steps": (
        "proreflow-ii", ["stages.*.loss_space=velocity", "stages.*.start_share=0.5", "stages.0.solver_steps=8",
                         "stages.1.solver_steps=16", "stages.2.solver_steps=32"]),
    # guidance (issue 13): PeRFlow's cfg_sync (unguided targets, student sampled with guidance) against baking it
    "ProReflow-II, velocity MSE, half at window starts, cfg_sync": (
        "proreflow-ii", ["stages.*.loss_space=velocity", "stages.*.start_share=0.5", *_CFG_SYNC]),
    "ProReflow-II, velocity MSE, half at window starts, last stage half the budget, cfg_sync": (
        "proreflow-ii", ["stages.*.loss_space=velocity", "stages.*.start_share=0.5", *_CFG_SYNC]),
    "ProReflow-II, velocity MSE with the epsilon space's balance between windows relative to the last, "
    "last stage half the budget, cfg_sync": (
        "proreflow-ii", [*_BALANCE, *_CFG_SYNC]),
    # student parametrization (issue 13): students from scratch, the network's output type
    "2-Reflow from scratch, epsilon output": ("reflow", ["from_scratch=true", "student_prediction=epsilon"]),
    "2-Reflow from scratch, velocity output": ("reflow", ["from_scratch=true", "student_prediction=velocity"]),
    "2-Reflow from scratch, x0 output": ("reflow", ["from_scratch=true", "student_prediction=sample"]),
    "2-Reflow from scratch, velocity output, aligned v, half at the start": (
        "reflow", ["from_scratch=true", "student_prediction=velocity", "stages.*.alpha=1.0",
                   "stages.*.start_share=0.5"]),
    "PeRFlow from scratch, velocity output": ("perflow", ["from_scratch=true", "student_prediction=velocity"]),
    "ProReflow-II from scratch, epsilon output": ("proreflow-ii", ["from_scratch=true",
                                                                  "student_prediction=epsilon"]),
    "ProReflow-II from scratch, velocity output": ("proreflow-ii", ["from_scratch=true",
                                                                   "student_prediction=velocity"]),
    # one student for every step count (issue 25): the shipped recipe whose last stage trains 4-, 2- and 1-window
    # targets (start_epsilon on the stage's one scale, time_weights' reference)
    ANY_STEP: ("proreflow-ii", [*_BALANCE, *_ANY_STEP]),
    "ProReflow any-step without the conditioning: last stage 4, 2 and 1 windows on the epsilon space's scale, "
    "last stage half the budget": ("proreflow-ii", [*_BALANCE, *_ANY_STEP[:2]]),
    "ProReflow any-step without the conditioning: last stage 4, 2 and 1 windows on the epsilon space's scale, "
    "last stage half the budget, alpha 10": ("proreflow-ii", [*_BALANCE, *_ANY_STEP[:2], "stages.*.alpha=10.0"]),
}
for _preset, _overrides in METHODS.values():
    # methods that do not name a start share keep the uniform t of the runs they were measured in (the
    # ProReflow presets before start_share: 0.5), so their names mean what the earlier tables say
    if _preset.startswith("proreflow") and not any("start_share" in o for o in _overrides):
        _overrides.insert(0, "stages.*.start_share=0.0")
    # likewise the loss weighting: none before round 5's start_epsilon
    if _preset.startswith("proreflow") and not any("loss_weighting" in o for o in _overrides):
        _overrides.insert(0, "stages.*.loss_weighting=none")
DEFAULT_METHOD = ("ProReflow-II, velocity MSE with the epsilon space's balance between windows relative to the last, "
                  "last stage half the budget")
"""The proreflow-ii preset as shipped (and ``proreflow demo``)."""
SHIPPED = {DEFAULT_METHOD: "proreflow-ii", ANY_STEP + ", alpha 10": "proreflow-any-step"}
"""Methods that are a shipped preset as it is, by the name their rows carry (when a preset changes, its rows are
measured again)."""
METHODS.update({name: (preset, []) for name, preset in SHIPPED.items()})
QUICK_METHODS = ["2-Reflow", "PeRFlow", "ProReflow-II", DEFAULT_METHOD]
CURVE_METHODS = ("PeRFlow", "ProReflow-II", "ProReflow-II, velocity MSE, half at window starts",
                 "ProReflow-II, velocity MSE, half at window starts, last stage half the budget", DEFAULT_METHOD,
                 "ProReflow-II, epsilon-space MSE, half at window starts")
TEACHER_STEPS = (32, 8, 4, 2, 1)
DPM_STEPS = (4, 2)
STUDENT_STEPS = (4, 2, 1)
BUDGET = {"2d": 800, "digits": 800, "mnist": 400}
"""Default optimiser steps per method and dataset kind (MNIST: what 2 CPU cores allow for 3 seeds)."""
MAIN_METRIC = {"2d": "energy_distance", "image": "fd"}


LAST_STAGE_HALF = "last stage half the budget"
"""Methods whose name says this give their last stage as many optimiser steps as all the others together (the
ProReflow presets since round 4); every other method splits its steps evenly, as the runs of the earlier tables did."""


def stage_steps(name: str, stages: int, total_steps: int) -> list[int]:
    """Optimiser steps of each stage of method ``name``: ``total_steps`` split evenly, or with weights
    ``1, ..., 1, stages - 1`` when the name says :data:`LAST_STAGE_HALF` (:func:`split_steps`)."""
    last = max(stages - 1, 1) if LAST_STAGE_HALF in name else 1
    return split_steps(total_steps, (1,) * (stages - 1) + (last,))


def method_recipe(name: str, total_steps: int, guidance: float, seed: int, lr: float | None,
                  settings: list[str] = ()):
    preset, overrides = METHODS[name]
    stages = len(load_recipe(preset).stages)
    extra = [*(f"stages.{i}.steps={n}" for i, n in enumerate(stage_steps(name, stages, total_steps))),
             f"stages.*.guidance={guidance}", f"seed={seed}", "checkpoint_every=0"]
    if lr is not None:
        extra.append(f"stages.*.lr={lr}")
    return load_recipe(preset, [*overrides, *extra, *settings])


def student_rows(result, evalset, method: str) -> list[dict]:
    rows = []
    for n in STUDENT_STEPS:
        windows = result.windows.for_steps(n)
        m = evaluate_sampler(evalset, result.student, windows, n, result.guidance)
        m.pop("samples")
        rows.append({"method": method, "steps": n, **m})
    return rows


DIAG_SAMPLES = 128
DIAG_SUBINTERVALS = 4


@torch.no_grad()
def window_diagnostics(setup, student, initial, recipe, data: str, guidance: float, seed: int,
                       samples: int = DIAG_SAMPLES, sub: int = DIAG_SUBINTERVALS) -> list[dict]:
    """Where a student fails: per window of its last stage and per sub-interval of t inside it, the RMS
    distance of its one-step endpoint ``x_t + (t_end - t) v(x_t, t)`` to the stage teacher's landing
    ``x_end``, for the trained student and for its initialisation (the teacher's weights: one DDIM step);
    also at each window's start ``t = t_start`` (x_t = noised data), the point a sampler with one step per
    window evaluates.

    Inputs: held-out test images (``samples`` per cell, cycling), fresh noise seeded by ``seed``, t at the
    centre of each sub-interval, and the last stage's own teacher (original, its solver steps, baked guidance).
    """
    stage = recipe.stages[-1]
    windows = TimeWindows(stage.windows)
    student = student.at_windows(stage.windows)  # a step-conditioned student: at the last stage's own count
    teacher = StageTeacher(setup.denoiser(setup.teacher_model), stage.solver_steps, None, stage.teacher_guidance())
    test = load_dataset(data, "test")
    g = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randint(len(test), (samples,), generator=g)
    x0 = test.x[idx]
    cond = None if test.labels is None else test.labels[idx]
    cond = cond if setup.uncond is not None else None
    uncond = None if cond is None else setup.uncond
    noise = torch.randn(x0.shape, generator=g)
    edges = windows.edges(torch.float64)
    rows = []
    for w in range(windows.count):
        start, end = float(edges[w]), float(edges[w + 1])
        for k in range(-1, sub):  # k = -1: the window's start, where a one-step-per-window sampler evaluates
            t_mid = start if k < 0 else start + (end - start) * (k + 0.5) / sub
            t = torch.full((samples,), t_mid)
            batch = make_reflow_batch(x0, noise, windows, teacher, setup.schedule, cond, uncond, t=t)
            x_end = batch.x_t + (batch.t_end - batch.t).reshape(-1, *[1] * (x0.ndim - 1)) * batch.v_target
            row = {"window": w, "t": t_mid, "t_start": start, "t_end": end}
            for name, model in (("student", student), ("initial", initial)):
                v = model.velocity(batch.x_t, batch.t, batch.t_end, cond)
                landing = batch.x_t + (batch.t_end - batch.t).reshape(-1, *[1] * (x0.ndim - 1)) * v
                row[name] = float((landing - x_end).flatten(1).pow(2).mean(1).sqrt().mean())
            rows.append(row)
    return rows


def check_swap_methods(methods: list[str]) -> str | None:
    """Why ``methods`` cannot be swapped window for window (their last stages differ in windows or in the teacher's
    solve, which :func:`window_swaps` takes from one of them), or None."""
    last = {name: load_recipe(*METHODS[name]).stages[-1] for name in methods}
    kinds = {(s.windows, s.solver, s.solver_steps) for s in last.values()}
    if len(kinds) > 1:
        got = "; ".join(f"{name}: {s.windows} windows, {s.solver_steps} {s.solver} steps" for name, s in last.items())
        return f"--swap needs methods whose last stages share their windows, solver and solver steps; got {got}"
    return None


def anchor_rows(data: str, teacher, evalset, guidance: float, seed: int, samples: int, kind: str = "ddpm"
                ) -> list[dict]:
    """Training-free rows of one evaluation set: teacher DDIM-n and DPM-Solver++ 2M (a DDPM teacher), or
    teacher Euler-n (a flow teacher: its ``sample`` loop is Euler; DPM-Solver++ needs a VP teacher)."""
    rows = []
    for n in TEACHER_STEPS:
        m = evaluate_sampler(evalset, teacher, TimeWindows(n), n, guidance)
        m.pop("samples")
        rows.append({"data": data, "seed": seed, "method": f"teacher {SAMPLER_NAMES[kind]}", "steps": n, "budget": 0,
                     "teacher_evals": 0, "samples": samples, **m})
    for n in DPM_STEPS if kind == "ddpm" else ():
        def dpm(noise, cond, n=n, uncond=evalset.uncond):
            return dpm_solver_sample(teacher, noise, n, cond, uncond, guidance)

        m = evaluate_callable(evalset, dpm, nfe=n * (2 if guidance != 1 and evalset.uncond is not None else 1))
        m.pop("samples")
        rows.append({"data": data, "seed": seed, "method": "DPM-Solver++ 2M", "steps": n, "budget": 0,
                     "teacher_evals": 0, "samples": samples, **m})
    return rows


def cached_eval_set(setup, data: str, teacher, samples: int, guidance: float, seed: int, cache: Path, log,
                    kind: str = "ddpm"):
    """The evaluation set and its anchor rows, computed once per (teacher, data, samples, guidance, seed).

    The teacher's DDIM-32 reference and the anchor rows cost about a third of an MNIST run's network
    evaluations and are the same for every method; they are kept in ``cache`` (``--work``) as a tensor file.
    """
    key = f"{Path(setup.info['teacher_path']).name}-n{samples}-g{guidance:g}-s{seed}-{VP_TIME_CONVENTION}"
    if setup.info.get("window_space", "sigma") != "sigma":  # a flow teacher sampled on another grid
        key += f"-{setup.info['window_space']}{setup.info['shift']:g}"
    path = cache / "evalsets" / f"{key}.pt"
    evalset = make_eval_set(data, teacher, 1, guidance, seed, progress=False)  # classifier and real data
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        return dataclasses.replace(evalset, noise=saved["noise"], cond=saved["cond"],
                                   reference=saved["reference"]), saved["rows"]
    start = time.perf_counter()
    evalset = make_eval_set(data, teacher, samples, guidance, seed, progress=False)
    rows = anchor_rows(data, teacher, evalset, guidance, seed, samples, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {"noise": evalset.noise, "cond": evalset.cond, "reference": evalset.reference, "rows": rows}
    atomic_write(path, lambda tmp: torch.save(saved, tmp))
    log(f"{data} seed {seed}: evaluation set and anchors in {time.perf_counter() - start:.0f} s (cached {path})")
    return evalset, rows


def run_dataset(data: str, args, log, save=lambda rows, diag, swaps: None) -> tuple[list[dict], ...]:
    """Metric rows, window-diagnostic rows and (``--swap``) window-swap rows of every seed and method on
    ``data``; ``save(rows, diag, swaps)`` after each trained method (a killed run keeps what it measured)."""
    guidance = args.guidance or GUIDANCE[data_kind(data)]
    overrides = {}
    if args.mlp_width:  # a wider (or narrower) teacher, and so student, of the same MLP architecture (main checks it)
        network = teacher_config(data).network
        overrides["network"] = {**network, "kwargs": {**network["kwargs"], "width": args.mlp_width}}
    setup = builtin_setup(data, teacher=args.teacher, progress=not args.no_progress, shift=args.shift,
                          window_space=args.window_space, from_scratch=True,  # make_student: from-scratch methods
                          **overrides)
    teacher = setup.denoiser(setup.teacher_model)
    # settings apart from the default's: (run-folder suffix, row label); runs apart (resume would refuse them), rows
    # labelled apart (tables and --merge group by data)
    variants = []
    if args.window_space != "sigma":
        variants.append((f"-{args.window_space}{args.shift:g}", f"{args.window_space} windows, shift {args.shift:g}"))
    if args.mlp_width:
        variants.append((f"-w{args.mlp_width}", f"MLP width {args.mlp_width}"))
    if guidance != GUIDANCE[data_kind(data)]:
        variants.append((f"-g{guidance:g}", f"guidance {guidance:g}"))
    runs = (data if args.teacher == "ddpm" else f"{data}-{args.teacher}") + "".join(s for s, _ in variants)
    label = f"{data} ({', '.join(name for _, name in variants)})" if variants else data
    rows, diag, swaps = [], [], []
    for seed in args.seeds:
        finished = {}  # method -> its run at the main budget (for --swap)
        samples = args.samples or (500 if args.quick and data_kind(data) != "2d" else default_eval_samples(data))
        evalset, anchors = cached_eval_set(setup, data, teacher, samples, guidance, seed, args.work, log,
                                            args.teacher)
        rows += [{**r, "data": label} for r in anchors]
        for method in args.methods:
            main_budget = args.budget or (600 if args.quick else BUDGET[data_kind(data)])
            curve = [main_budget // 4, main_budget // 2] if args.curve_budgets is None else args.curve_budgets
            for budget in sorted({main_budget, *(curve if method in CURVE_METHODS else [])}):
                recipe = method_recipe(method, budget, guidance, seed, args.lr,
                                       [f"target_cache={args.work / 'targets'}", *args.set])
                start = time.perf_counter()
                # resume=True: a killed benchmark continues its runs, and a finished run is read back, not retrained
                result = train(recipe, setup, args.work / runs / f"{method}-{budget}-s{seed}".replace(" ", "_"),
                               progress=not args.no_progress, resume=True)
                evals = sum(s.teacher_evals for s in result.stages)
                trained = time.perf_counter() - start
                for r in student_rows(result, evalset, method):
                    rows.append({"data": label, "seed": seed, "budget": budget, "teacher_evals": evals,
                                 "samples": samples, **r})
                evaluated = time.perf_counter() - start - trained
                if budget == main_budget:
                    finished[method] = result
                    for r in window_diagnostics(setup, result.student, teacher, recipe, data, guidance, seed):
                        diag.append({"data": label, "seed": seed, "method": method, "budget": budget, **r})
                save(rows, diag, swaps)
                log(f"{data} seed {seed} {method} budget {budget}: trained {trained:.0f} s, "
                    f"evaluated {evaluated:.0f} s, diagnostics "
                    f"{time.perf_counter() - start - trained - evaluated:.0f} s, "
                    f"teacher evals {evals:,}")
        if args.swap:
            start = time.perf_counter()
            swaps += [{"data": label, "seed": seed, "budget": main_budget, "samples": samples, **r}
                      for r in window_swaps(finished, teacher, recipe, evalset, STUDENT_STEPS)]
            save(rows, diag, swaps)
            log(f"{data} seed {seed} window swaps: {time.perf_counter() - start:.0f} s")
        log(f"{data} seed {seed} done")
    return rows, diag, swaps


def aggregate(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["method"], r["steps"], r["budget"]), []).append(r)
    out = []
    for (data, method, steps, budget), rs in groups.items():
        agg = {"data": data, "method": method, "steps": steps, "budget": budget, "seeds": len(rs),
               "samples": rs[0].get("samples"),
               "teacher_evals": int(statistics.mean(r["teacher_evals"] for r in rs)), "nfe": rs[0]["nfe"]}
        for key in ("fd", "accuracy", "sliced_wasserstein", "energy_distance", "fidelity", "straightness"):
            vals = [r[key] for r in rs if key in r]
            if vals:
                agg[key] = statistics.mean(vals)
                agg[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(agg)
    return out


def markdown(agg: list[dict], args, seconds: float) -> str:
    lines = ["# Quality benchmark: generated tables", "",
             "Written by `benchmarks/quality.py`. The results page for users is `docs/results.md`; the study that "
             "reads these tables is in `docs/research/`.", "",
             f"Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} threads; torch {torch.__version__}; "
             f"diffusers {diffusers.__version__}; "
             f"Python {platform.python_version()}; date {time.strftime('%Y-%m-%d')}; " +
             (f"rows merged from {args.merged_runs} earlier runs of this teacher  " if args.merge else
              f"wall time {seconds / 60:.1f} min  "),
             f"Teacher: {'flow matching (Euler sampler)' if args.teacher == 'flow' else 'DDPM (DDIM sampler)'}.  ",
             f"Seeds: {args.seeds} (recipe seed = evaluation-noise seed); evaluation samples per sampler: "
             "given under each dataset.  ",
             "Budget: optimiser steps per method (split evenly over its stages, batch 64), the same for every "
             "distilled method; `teacher evals` is the count of teacher network evaluations each spent "
             "(a guided call counts 2 per sample).  ",
             "Metrics (mean ± std over seeds): `fd` Frechet distance in a trained classifier's features to the "
             "held-out real data (lower is better); `acc` class accuracy of conditional samples; `energy` / `sw` "
             "energy distance / sliced Wasserstein to the true 2D distribution; `fidelity` RMS distance to the "
             "teacher's DDIM-32 (flow teacher: Euler-32) sample from the same noise; `straight` trajectory "
             "straightness (0 = straight); "
             "`nfe` network evaluations per sample. Students with more windows than steps are sampled by jumping "
             "to the ends of `steps` merged windows (their DDIM-like epsilon parametrization).", ""]
    for data in dict.fromkeys(r["data"] for r in agg):
        rows = [r for r in agg if r["data"] == data]
        image = "fd" in rows[0]
        cols = (["fd", "accuracy"] if image else ["energy_distance", "sliced_wasserstein"]) + ["fidelity",
                                                                                                "straightness"]
        names = {"fd": "fd", "accuracy": "acc", "energy_distance": "energy", "sliced_wasserstein": "sw",
                 "fidelity": "fidelity", "straightness": "straight"}
        lines += [f"## {data}", "", f"Evaluation samples per sampler: {rows[0]['samples']}.", "",
                  "| method | budget (steps) | teacher evals | steps | nfe | " +
                  " | ".join(names[c] for c in cols) + " |", "|---|---|---|---|---|" + "---|" * len(cols)]
        for r in rows:
            cells = [f"{r[c]:.4g} ± {r[c + '_std']:.2g}" if c in r else "-" for c in cols]
            lines.append(f"| {r['method']} | {r['budget'] or '-'} | {r['teacher_evals']:,} | {r['steps']} | "
                         f"{r['nfe']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def budget_plot(agg: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["data"] for r in agg))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.4), squeeze=False)
    for ax, data in zip(axes[0], datasets):
        metric = "fd" if any("fd" in r for r in agg if r["data"] == data) else "energy_distance"
        for method in CURVE_METHODS:
            pts = sorted((r["budget"], r[metric], r[metric + "_std"]) for r in agg
                         if r["data"] == data and r["method"] == method and r["steps"] == 4)
            if pts:
                b, m, s = zip(*pts)
                ax.errorbar(b, m, yerr=s, marker="o", capsize=3, label=method)
        teacher = [(r[metric], r["method"]) for r in agg if r["data"] == data and r["method"] in
                   (f"teacher {name}" for name in SAMPLER_NAMES.values()) and r["steps"] == 32]
        if teacher:
            ax.axhline(teacher[0][0], color="gray", ls="--", lw=1, label=f"{teacher[0][1]}-32")
        ax.set_xscale("log")
        ax.set_xlabel("optimiser steps (training budget)")
        ax.set_ylabel(f"{metric} at 4 steps")
        ax.set_title(data)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _diag_mean(diag: list[dict]) -> dict[tuple, dict]:
    """Mean over seeds of the window diagnostics, keyed by (data, method, budget, window, t)."""
    groups: dict[tuple, list[dict]] = {}
    for r in diag:
        groups.setdefault((r["data"], r["method"], r["budget"], r["window"], r["t"]), []).append(r)
    return {k: {"student": statistics.mean(r["student"] for r in rs),
                "initial": statistics.mean(r["initial"] for r in rs), "seeds": len(rs)} for k, rs in groups.items()}


def diagnostics_markdown(diag: list[dict]) -> str:
    """Per window and sub-interval of t: the student's and its initialisation's endpoint error (mean of seeds)."""
    if not diag:
        return ""
    mean = _diag_mean(diag)
    lines = ["", "## Where students fail: endpoint error per window and sub-interval of t", "",
             "RMS distance of the one-step landing `x_t + (t_end - t) v(x_t, t)` to the last stage teacher's "
             f"landing `x_end` ({DIAG_SAMPLES} held-out samples per cell, t at the centre of {DIAG_SUBINTERVALS} "
             "sub-intervals of each window of the student's last stage; `initial` = the student's initialisation, "
             "the teacher's weights, i.e. one DDIM step). Mean over seeds; `ratio` = student / initial "
             "(< 1: training helped).", ""]
    keys = sorted(mean, key=lambda k: (k[0], k[1], k[2], k[3], -k[4]))
    groups: dict[tuple, list[tuple]] = {}
    for k in keys:
        groups.setdefault(k[:3], []).append(k)
    for (data, method, budget), ks in groups.items():
        lines += [f"**{data}, {method}, budget {budget}** ({mean[ks[0]]['seeds']} seeds)", "",
                  "| window | t | student | initial | ratio |", "|---|---|---|---|---|"]
        for k in ks:
            m = mean[k]
            lines.append(f"| {k[3]} | {k[4]:.3f} | {m['student']:.4g} | {m['initial']:.4g} | "
                         f"{m['student'] / max(m['initial'], 1e-12):.3f} |")
        lines.append("")
    return "\n".join(lines)


def swaps_markdown(swaps: list[dict]) -> str:
    """The window swaps (:func:`window_swaps`), mean ± std over seeds of each plan (the source of each window):
    for 2 windows a table with the noisy window's source as rows and the last window's as columns."""
    if not swaps:
        return ""
    lines = ["", "## Which window sets the quality: window swaps", "",
             "Each student sampled with the crossing of one window of its last stage taken from another source: "
             "another method's student, `teacher` (the stage teacher's solve) or `initial` (the teacher's weights, "
             "DDIM steps to the window's end). Window 0 is the noisy one. Mean ± std over seeds.", ""]
    for data in dict.fromkeys(r["data"] for r in swaps):
        rows = [r for r in swaps if r["data"] == data]
        metric = "fd" if "fd" in rows[0] else "energy_distance"
        methods = list(dict.fromkeys(r["method"] for r in rows))
        name = {m: f"M{i + 1}" for i, m in enumerate(methods)}
        cells: dict[tuple, dict] = {}  # (steps, plan) -> seed -> value (a plan reached from two methods counts once)
        for r in rows:
            cells.setdefault((r["steps"], tuple(name.get(p, p) for p in r["plan"])), {})[r["seed"]] = r[metric]

        def cell(key, cells=cells) -> str:
            vals = list(cells.get(key, {}).values())
            spread = statistics.stdev(vals) if len(vals) > 1 else 0
            return f"{statistics.mean(vals):.4g} ± {spread:.2g}" if vals else "-"

        lines += [f"**{data}**, {metric} ({', '.join(f'{name[m]} = {m}' for m in methods)})", ""]
        for steps in sorted({k[0] for k in cells}, reverse=True):
            plans = [k[1] for k in cells if k[0] == steps]
            if all(len(p) == 2 for p in plans):
                used = {p for plan in plans for p in plan}
                sources = [p for p in (*name.values(), *SWAP_SOURCES) if p in used]
                lines += [f"{steps} steps; rows: window 0, columns: window 1", "",
                          "| window 0 \\ window 1 | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
                lines += [f"| {a} | " + " | ".join(cell((steps, (a, b))) for b in sources) + " |" for a in sources]
            else:
                lines += [f"{steps} steps", "", f"| sources of windows 0, 1, ... | {metric} |", "|---|---|"]
                lines += [f"| {', '.join(plan)} | {cell((steps, plan))} |" for plan in plans]
            lines.append("")
    return "\n".join(lines)


def diagnostics_plot(diag: list[dict], path: Path) -> None:
    """Endpoint error vs t, one panel per dataset, student (solid) and initialisation (dotted) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = _diag_mean(diag)
    datasets = list(dict.fromkeys(k[0] for k in mean))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.8), squeeze=False)
    for ax, data in zip(axes[0], datasets):
        combos = list(dict.fromkeys(k[1:3] for k in mean if k[0] == data))
        for i, (method, budget) in enumerate(combos):
            ks = sorted((k for k in mean if k[0] == data and k[1:3] == (method, budget)), key=lambda k: -k[4])
            color = f"C{i % 10}"
            for w in sorted({k[3] for k in ks}):
                kw = [k for k in ks if k[3] == w]
                ts = [k[4] for k in kw]
                ax.plot(ts, [mean[k]["student"] for k in kw], "-o", ms=3, color=color,
                        label=f"{method} ({budget})" if w == 0 else None)
                ax.plot(ts, [mean[k]["initial"] for k in kw], ":", color=color)
        ax.invert_xaxis()
        ax.set_yscale("log")
        ax.set_xlabel("t (1 = noise)")
        ax.set_ylabel("endpoint RMS error vs stage teacher")
        ax.set_title(f"{data} (dotted: initialisation)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_teacher(argv: list[str]) -> str:
    """The ``--teacher`` a saved run was made with (runs from before the option: ddpm)."""
    return argv[argv.index("--teacher") + 1] if "--teacher" in argv[:-1] else "ddpm"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one seed, digits, 4 methods, 600 steps, 500 samples")
    p.add_argument("--data", nargs="+", default=None, help="datasets (default: moons digits mnist)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default 0 1 2)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), metavar="METHOD",
                   help="methods (default: all): " + "; ".join(METHODS))
    p.add_argument("--budget", type=int, default=None, help="optimiser steps of every method (default: per dataset, "
                   + ", ".join(f"{k} {v}" for k, v in BUDGET.items()) + "; 600 with --quick)")
    p.add_argument("--curve-budgets", nargs="*", type=int, default=None,
                   help="extra budgets for " + ", ".join(CURVE_METHODS) + " (quality-vs-budget plot; "
                   "default: budget / 4 and budget / 2)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of every stage (default: the preset's)")
    p.add_argument("--teacher", choices=TEACHER_KINDS, default="ddpm",
                   help="the built-in teacher: ddpm (epsilon prediction, default) or flow (flow matching, sampled "
                   "by Euler; no DPM-Solver++ rows)")
    p.add_argument("--window-space", choices=("sigma", "unshifted"), default="sigma",
                   help="flow teacher: windows (and every sampler's steps) uniform in sigma, or in diffusers' "
                        "unshifted s with --shift (issue 15's window_space; runs and anchors kept apart)")
    p.add_argument("--shift", type=float, default=1.0, help="flow teacher: the shift of --window-space unshifted "
                   "(SD3: 3)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale of teacher and students (default: 2 on digits / MNIST, 1 on 2D data)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="recipe overrides applied to every method after its own, e.g. stages.*.ema_decay=0.99")
    p.add_argument("--samples", type=int, default=None,
                   help="evaluation samples per sampler (default: 10000 for 2D data, whose distances have a "
                   "finite-sample floor; 1000 for images, 500 with --quick)")
    p.add_argument("--out", type=Path, default=ROOT / "docs",
                   help="where results.json, the plots and (except for docs/) results.md go (default docs/)")
    p.add_argument("--tables", type=Path, default=None,
                   help="where the markdown tables go (default OUT/results.md; with the default --out docs/, "
                        "docs/research/quality-tables.md, since docs/results.md is the results page for users)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "quality", help="training runs (default runs/quality)")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                   help="do not train: re-render the tables from the rows of earlier runs' JSON files")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the built-in networks are tiny, more threads only contend)")
    p.add_argument("--mlp-width", type=int, default=None,
                   help="width of the MLP teacher (2D data, digits; default: the built-in's), trained and cached once "
                        "per width; the students are its copies")
    p.add_argument("--swap", action="store_true",
                   help="window swaps: sample each of --methods with one window's crossing from another method's "
                        "student, the teacher or the initialisation (the methods must share the last stage's windows)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    quick = args.quick
    torch.set_num_threads(args.threads)
    args.data = args.data or (["digits"] if quick else ["moons", "digits", "mnist"])
    args.seeds = args.seeds or ([0] if quick else [0, 1, 2])
    args.methods = args.methods or (QUICK_METHODS if quick else list(METHODS))
    if quick and args.curve_budgets is None:
        args.curve_budgets = []
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {msg}", flush=True)

    if not args.merge:
        for data in args.data if args.mlp_width else ():
            if (kind := teacher_config(data).network["class"]) != "MLPDenoiser":
                p.error(f"--mlp-width is for the MLP teachers (2D data, digits); {data}'s teacher is a {kind}: "
                        "leave --mlp-width out for it")
        if args.swap and (problem := check_swap_methods(args.methods)):
            p.error(problem)
    if args.merge:
        runs = [json.loads(path.read_text()) for path in args.merge]
        # only quality runs (they record their argv) of this --teacher: a glob of docs/research/runs/ holds both
        runs = [run for run in runs if "argv" in run and run_teacher(run["argv"]) == args.teacher]
        args.merged_runs = len(runs)
        rows = [r for run in runs for r in run["rows"]]
        diag = [r for run in runs for r in run.get("diagnostics", [])]
        swaps = [r for run in runs for r in run.get("swaps", [])]
        # runs of extra methods repeat the training-free anchors of the same seeds: keep one of each
        rows = list({(r["data"], r["seed"], r["method"], r["steps"], r["budget"]): r for r in rows}.values())
        diag = list({(r["data"], r["seed"], r["method"], r["budget"], r["window"], r["t"]): r
                     for r in diag}.values())
        args.data = list(dict.fromkeys(r["data"] for r in rows))
        args.seeds = sorted({r["seed"] for r in rows})
    else:
        rows, diag, swaps = [], [], []
        partial = args.out / f"{'results-quick' if quick else 'results'}-partial.json"

        def save(new_rows, new_diag, new_swaps):
            partial.write_text(json.dumps({"argv": sys.argv[1:], "rows": rows + new_rows,
                                           "diagnostics": diag + new_diag, "swaps": swaps + new_swaps}, indent=1))

        for data in args.data:
            more_rows, more_diag, more_swaps = run_dataset(data, args, log, save)
            rows, diag, swaps = rows + more_rows, diag + more_diag, swaps + more_swaps
    agg = aggregate(rows)
    stem = "results-quick" if quick else "results"
    (args.out / f"{stem}.json").write_text(json.dumps({"argv": sys.argv[1:], "rows": rows, "aggregate": agg,
                                                       "diagnostics": diag, "swaps": swaps}, indent=1))
    tables = args.tables or (TABLES if stem == "results" and args.out.resolve() == (ROOT / "docs").resolve()
                             else args.out / f"{stem}.md")
    tables.parent.mkdir(parents=True, exist_ok=True)
    tables.write_text(markdown(agg, args, time.perf_counter() - start) + diagnostics_markdown(diag) +
                      swaps_markdown(swaps))
    if args.curve_budgets != [] and agg:
        budget_plot(agg, args.out / "quality_vs_budget.png")
    if diag:
        diagnostics_plot(diag, args.out / f"{stem}-windows.png")
    log(f"wrote {tables} and {args.out / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
