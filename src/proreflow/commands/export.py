"""``proreflow export``: a trained Stable Diffusion, SD3 or PixArt student as a diffusers pipeline folder or LoRA.

    proreflow export --run runs/sd15 --out exports/sd15-4w            # full pipeline folder
    proreflow export --run runs/sd15 --out exports/sd15-lora --lora   # LoRA for the base model
    proreflow export --run runs/sd15 --out exports/sd15-4w --dtype float16 --eval evals/sd15 \
        --push-to-hub me/sd15-proreflow-4step
    proreflow export --run runs/sd3 --out exports/sd3-4w              # an SD3 run: the same options
    proreflow export --run runs/pixart --out exports/pixart-4w        # a PixArt run: pipeline folders only

The family comes from the run's ``student.json`` (its setup). The folders load with diffusers alone
(Stable Diffusion: a stock DDIMScheduler is the student's sampler, see :mod:`proreflow.sd.export`;
SD3: the stock FlowMatchEulerDiscreteScheduler at the ``sigmas`` of ``proreflow.json``, see
:mod:`proreflow.sd3.export`; PixArt: the stock DDIMScheduler, :mod:`proreflow.pixart.export`) and
carry a model card (README.md).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from . import Failure, UsageError, bounded_int, existing_dir, writable_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="output folder of a `proreflow train` run (stable-diffusion, "
                   "stable-diffusion-3 or pixart setup)")
    p.add_argument("--out", required=True, help="folder to write: a new or empty one, or an earlier export "
                   "(replaced whole)")
    p.add_argument("--teacher", help="teacher pipeline folder or hub id (default: the one the run was trained from)")
    p.add_argument("--lora", action="store_true",
                   help="write LoRA weights (pipe.load_lora_weights) instead of a full pipeline")
    p.add_argument("--steps", type=bounded_int(1, 1024),
                   help="a step-conditioned (any-step) student: the step count to export it for, one of those it "
                        "was trained for (its network at that count, folded into a stock one); required there")
    p.add_argument("--lora-rank", type=bounded_int(1, 4096), default=64,
                   help="rank when extracting LoRA from a fully fine-tuned student (default 64)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the saved weights (default float32; SDXL's VAE overflows in float16: "
                        "prefer bfloat16 there)")
    p.add_argument("--eval", metavar="DIR", help="a `proreflow eval` output folder: its results go into the model card")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hugging Face model repo "
                   "(created if missing; token from `hf auth login` or HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("--local-files-only", action=argparse.BooleanOptionalAction, default=None,
                   help="never download (default: on when HF_HUB_OFFLINE=1)")


def run(args: argparse.Namespace) -> int:
    from ..files import remove_stale_temporaries, replace_dir, temporary_path
    from ..sd.export import EXPORT_INFO, push_to_hub, read_metrics
    from ..sd.pipeline import read_model_index
    from ..training.checkpoint import DamagedCheckpointError, check_weights_file
    from ..training.environment import as_dtype
    from ..training.recipes import load_recipe
    from ..training.student import read_student_info
    from .named_setups import FAMILIES, load

    run_dir = existing_dir(args.run, "--run")
    info_path = run_dir / "student.json"
    if not info_path.is_file():
        raise UsageError(f"--run: {info_path} not found; --run takes the output folder of a finished "
                         "`proreflow train` run")
    try:
        info = read_student_info(run_dir)
    except ValueError as err:
        raise UsageError(f"--run: {err}") from None
    weights = run_dir / "student.safetensors"
    if not weights.is_file():
        raise UsageError(f"--run: {weights} is missing; --run takes the output folder of a finished `proreflow "
                         "train` run")
    check_weights_file(weights, DamagedCheckpointError, f"the run's student {weights}")  # damaged: exit code 1
    source = args.teacher or info.get("info", {}).get("teacher")
    if not source:
        raise UsageError("the run does not name its teacher; pass --teacher")
    metrics = None
    if args.eval:
        try:
            metrics = read_metrics(args.eval)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"--eval: {err}") from None
    out = writable_dir(args.out)
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_INFO).is_file():
        raise UsageError(f"--out: {out} is not empty and holds no earlier export ({EXPORT_INFO}); give a new or "
                         "empty folder (an earlier export there is replaced whole)")
    read_model_index(source, args.local_files_only)  # a wrong teacher fails before anything loads
    name = info.get("info", {}).get("model")
    if name not in FAMILIES:
        raise UsageError(f"--run: {run_dir} is a {name or 'built-in data'!r} run; export takes runs of the "
                         f"{' or '.join(FAMILIES)} setups")
    family = FAMILIES[name]
    extra = {"run": str(run_dir), "recipe": info.get("recipe"), "stage": info.get("stage"),
             "guidance_mode": info.get("guidance_mode"), "global_step": info.get("global_step")}
    if (run_dir / "recipe.yaml").is_file():  # the guidance of the teacher the final student reproduces
        extra["teacher_guidance"] = load_recipe(run_dir / "recipe.yaml").stages[-1].guidance
    if args.push_to_hub:
        extra["repo_id"] = args.push_to_hub  # the model card's loading lines name the repo
    if args.lora and not family.lora_export:
        raise UsageError(f"--lora: diffusers' {name} pipelines cannot load LoRA weights (no load_lora_weights); "
                         "export the student as a pipeline folder (without --lora)")
    if args.lora and info.get("step_counts"):
        raise UsageError("--lora: a step-conditioned student's step count lives in the biases of its time embedding, "
                         "which LoRA weights do not carry; export it as a pipeline folder (without --lora)")
    if args.steps is not None:
        extra["served_steps"] = info.get("served_windows")
    dtype = as_dtype(args.dtype) if args.dtype else None
    export = load(family.export)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # those of an export killed before it could clean up
    tmp = temporary_path(out)  # built whole beside --out, then moved in: never a mix of two exports
    try:
        line = export(args, run_dir, source, info["info"], extra, dtype, metrics, tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(line)
    if args.push_to_hub:
        try:
            url = push_to_hub(args.out, args.push_to_hub, private=args.private)
        except Exception as err:  # the hub's and the network's errors are of every kind
            raise Failure(f"the export is written to {args.out}; uploading it to {args.push_to_hub} failed "
                          f"({type(err).__name__}: {err}); upload it later with `hf upload`") from err
        print(f"uploaded to {url}")
    return 0


def export_sd(args: argparse.Namespace, run_dir, source: str, setup_info: dict, extra: dict, dtype,
               metrics, out) -> str:
    """A stable-diffusion run as a pipeline with the stock DDIM, or LoRA; the line to print."""
    from ..sd.export import export_lora, export_pipeline, load_run_student
    from ..sd.pipeline import load_teacher
    from ..sd.scheduler import TRAILING_DDIM_LINE

    teacher = load_teacher(source, local_files_only=args.local_files_only)
    student, info = load_run_student(run_dir, teacher.unet, steps=args.steps)
    windows, guidance = info["windows"], info.get("guidance", 1.0)
    if args.lora:
        path, kept = export_lora(student, teacher, out, windows, guidance, args.lora_rank, extra, dtype, metrics)
        return (f"wrote {Path(args.out) / path.name} and its kohya / ComfyUI copy (LoRA for {source}; keeps "
                f"{kept:.1%} of the weight change). Sample with `pipe.load_lora_weights(DIR)`, then\n"
                f"  {TRAILING_DDIM_LINE}\n"
                f"and num_inference_steps={windows}")
    export_pipeline(student, teacher, out, windows, guidance, extra, dtype, metrics)
    return (f"wrote the pipeline folder {args.out} ({windows} windows; sample with num_inference_steps={windows}, "
            f"or `proreflow sample --model {args.out} --prompt ...`)")


def export_sd3(args: argparse.Namespace, run_dir, source: str, setup_info: dict, extra: dict, dtype,
                metrics, out) -> str:
    """A stable-diffusion-3 run as a pipeline with its window sigmas, or LoRA; the line to print."""
    from ..sd.export import load_run_student, read_export_info
    from ..sd3.export import export_sd3_lora, export_sd3_pipeline
    from ..sd3.pipeline import load_sd3_teacher

    teacher = load_sd3_teacher(source, use_t5=setup_info.get("use_t5", True),
                               window_space=setup_info.get("window_space", "sigma"),
                               local_files_only=args.local_files_only)
    student, info = load_run_student(run_dir, teacher.transformer, "stable-diffusion-3", args.steps)
    windows, guidance, resolution = info["windows"], info.get("guidance", 1.0), setup_info.get("resolution")
    if args.lora:
        path, kept = export_sd3_lora(student, teacher, out, windows, guidance, args.lora_rank, resolution,
                                     extra, dtype, metrics)
        what = (f"{Path(args.out) / path.name} (LoRA for {source}; keeps {kept:.1%} of the weight change). "
                "Sample with `pipe.load_lora_weights(DIR)`, then")
    else:
        export_sd3_pipeline(student, teacher, out, windows, guidance, resolution, extra, dtype, metrics)
        what = f"the pipeline folder {args.out} ({windows} windows). Sample with"
    sigmas = read_export_info(out)["sigmas"]
    return (f"wrote {what} pipe(prompt, sigmas={sigmas}, guidance_scale={guidance:g}) (proreflow.json), or "
            f"`proreflow sample --model {args.out if not args.lora else source} "
            f"{'--lora ' + str(args.out) + ' ' if args.lora else ''}--prompt ...`")


def export_pixart(args: argparse.Namespace, run_dir, source: str, setup_info: dict, extra: dict, dtype,
                   metrics, out) -> str:
    """A pixart run as a PixArt pipeline with the stock DDIM (LoRA merged); the line to print."""
    from ..pixart.export import export_pixart_pipeline, load_run_student
    from ..pixart.pipeline import load_pixart_teacher

    teacher = load_pixart_teacher(source, local_files_only=args.local_files_only)
    student, info = load_run_student(run_dir, teacher.transformer, "pixart", args.steps)
    windows, guidance, resolution = info["windows"], info.get("guidance", 1.0), setup_info.get("resolution")
    export_pixart_pipeline(student, teacher, out, windows, guidance, resolution, extra, dtype, metrics)
    return (f"wrote the pipeline folder {args.out} ({windows} windows; sample with num_inference_steps={windows}, "
            f"height = width = {resolution or teacher.resolution})")
