"""``proreflow demo --data mnist-t2i``: the Stable Diffusion path on the built-in text-to-image teacher.

Everything runs as a user runs it: the teacher (``proreflow teacher --data mnist-t2i``, cached), then
``proreflow train --config configs/mnist-t2i.yaml setup.teacher=... setup.data=...``, ``proreflow
export`` and ``proreflow eval`` (teacher DDIM-32 / 8 / 4 / 2 / 1, DPM-Solver++ 4 and the student at
4 / 2 / 1 steps on the held-out captions: FD and prompt accuracy of the built-in MNIST classifier,
optionally Inception FID). The report section holds the table, a grid per held-out caption template
(rows: teacher and student step counts; columns: the digits 0-9) and the lines of plain diffusers
that load the exported student.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..builtin.t2i import HELDOUT_TEMPLATES, NAME, caption, load_or_train_t2i_teacher

CONFIG = Path(__file__).resolve().parents[3] / "configs" / f"{NAME}.yaml"
"""The recipe (configs/mnist-t2i.yaml of the repository this package is installed from)."""
STUDENT_STEPS = (4, 2, 1)
TEACHER_BASELINES = (8, 4, 2, 1)
DPM_STEPS = (4,)
GRID_STEPS = (4, 2, 1)


def config_path() -> Path:
    if not CONFIG.is_file():
        raise FileNotFoundError(f"{CONFIG} not found: the {NAME} demo reads configs/{NAME}.yaml of the repository; "
                                "install proreflow from a clone (pip install -e .)")
    return CONFIG


def _overrides(args: argparse.Namespace, teacher=None, latents: Path | None = None) -> list[str]:
    from ..training.recipes import budget_overrides, load_recipe

    words = [f"seed={args.seed}"]
    if args.steps:
        words += budget_overrides(load_recipe(config_path()), args.steps)
    if teacher is not None:
        words += [f"setup.teacher={teacher.pipeline}", f"setup.data={teacher.data['train']}",
                  f"setup.cache_dir={latents}"]
    return words


def t2i_recipe(args: argparse.Namespace):
    """The demo's recipe (checked before anything trains)."""
    from ..training.recipes import load_recipe

    return load_recipe(config_path(), _overrides(args))


def _cli(words: list[str]) -> None:
    from ..cli import main

    code = main(words)
    if code != 0:
        raise RuntimeError(f"`proreflow {' '.join(words)}` exited with {code}")


def text_to_image_demo(args: argparse.Namespace, out: Path) -> tuple[str, dict]:
    """Teacher, distillation, export, evaluation and grids into ``out``; the report section and results."""
    start = time.perf_counter()
    teacher = load_or_train_t2i_teacher(cache_dir=args.cache_dir, progress=not args.no_progress)
    run, export, evaluation = out / "run", out / "export", out / "eval"
    train = ["train", "--config", str(config_path()), "--out", str(run), "--resume",
             *(["--allow-recipe-change"] if args.allow_recipe_change else []),
             *(["--no-progress"] if args.no_progress else []), *_overrides(args, teacher, out / "latents")]
    _cli(train)
    _cli(["export", "--run", str(run), "--out", str(export)])
    samples = args.samples or 1000
    steps = lambda values: ",".join(map(str, values))  # noqa: E731
    evaluate = ["eval", "--teacher", str(teacher.pipeline), "--student", str(export), "--images",
                str(teacher.data["heldout"]), "--classifier", "mnist", "--num", str(samples), "--steps",
                steps(STUDENT_STEPS), "--teacher-steps", "32", "--teacher-baselines", steps(TEACHER_BASELINES),
                "--dpm-solver-steps", steps(DPM_STEPS), "--batch-size", "100", "--device", "cpu", "--out",
                str(evaluation), "--seed", str(args.seed), "--grid-prompts", "10",
                *(["--cache-dir", args.cache_dir] if args.cache_dir else []), "--fid" if args.fid else "--no-fid"]
    _cli(evaluate)
    grids = template_grids(teacher.pipeline, export, out, args.seed)
    results = json.loads((evaluation / "results.json").read_text())
    results["minutes"] = (time.perf_counter() - start) / 60
    results["commands"] = [" ".join(["proreflow", *words]) for words in (train, ["export", "--run", str(run),
                                                                                  "--out", str(export)], evaluate)]
    return _section(teacher, export, results, grids, out.name), results


@torch.no_grad()
def template_grids(teacher_dir: Path, export: Path, out: Path, seed: int) -> list[Path]:
    """Per held-out template a grid: the digits 0-9 (columns) by the teacher's DDIM-32 and the student at
    :data:`GRID_STEPS` steps (rows), from the same noise per column."""
    from diffusers import StableDiffusionPipeline

    from ..sd.export import load_student_pipeline
    from ..sd.fid import to_uint8_rgb
    from ..sd.grids import prompt_row, stack_rows
    from ..sd.pipeline import SDTeacher
    from ..sd.t2i import ddim_sampler, pipeline_sampler, prompt_noise

    teacher = StableDiffusionPipeline.from_pretrained(teacher_dir)
    student, info = load_student_pipeline(export)
    guidance = info.get("guidance", 1.0)
    methods = [ddim_sampler(teacher, 32, info.get("teacher_guidance", guidance))]
    methods += [pipeline_sampler(student, n, guidance, f"student {n}-step") for n in GRID_STEPS]
    sd = SDTeacher(teacher, str(teacher_dir))
    noise = prompt_noise(seed, range(10), sd.latent_shape(sd.resolution))
    paths = []
    for k, template in enumerate(HELDOUT_TEMPLATES):
        prompts = [caption(d, template) for d in range(10)]
        rows = [prompt_row(list(to_uint8_rgb(m.generate(noise, prompts))), [str(d) for d in range(10)],
                           f"{m.name}: {template!r}") for m in methods]
        paths.append(out / f"grid_template_{k}.png")
        stack_rows(rows).save(paths[-1])
    return paths


def _cell(value) -> str:
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _section(teacher, export: Path, results: dict, grids: list[Path], folder: str) -> str:
    columns = [("method", "name"), ("steps", "steps"), ("FD ↓", "fd"), ("accuracy ↑", "accuracy"), ("FID ↓", "fid"),
               ("RMSE to teacher ↓", "rmse_to_teacher"), ("s / image", "seconds_per_image")]
    columns = [(t, k) for t, k in columns if k in ("name", "steps") or any(r.get(k) is not None
                                                                             for r in results["results"])]
    table = ["| " + " | ".join(t for t, _ in columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(_cell(r.get(k)) for _, k in columns) + " |" for r in results["results"]]
    settings = results["settings"]
    usage = ["from diffusers import StableDiffusionPipeline",
             f'pipe = StableDiffusionPipeline.from_pretrained("{export}")',
             f'image = pipe("a handwritten digit seven", num_inference_steps=2, '
             f'guidance_scale={settings["student_guidance"]:g}, height=32, width=32).images[0]']
    pictures = "\n".join(f"![held-out template {k}: {HELDOUT_TEMPLATES[k]!r}]({folder}/{p.name})"
                         for k, p in enumerate(grids))
    commands = "\n".join(f"    {c}" for c in results["commands"])
    return (f"## {NAME}\n\nThe built-in text-to-image teacher (a StableDiffusionPipeline folder, 32 px, trained on "
            f"MNIST with captions: {teacher.pipeline}), distilled with configs/{NAME}.yaml (ProReflow-II, "
            f"cfg_sync) in {results['minutes']:.1f} minutes with the teacher "
            f"{'trained in this run' if teacher.trained else 'cached'}. Commands:\n\n{commands}\n\n"
            f"{settings['count']} held-out captions (templates never seen in training); teacher guidance "
            f"{settings['teacher_guidance']:g}, student guidance {settings['student_guidance']:g}. `FD`: Fréchet "
            "distance in the built-in MNIST classifier's features against the held-out real images; `accuracy`: "
            "share of images the classifier reads as the digit the caption names.\n\n" + "\n".join(table)
            + f"\n\n{pictures}\n\nThe exported student in plain diffusers:\n\n```python\n" + "\n".join(usage)
            + "\n```\n")
