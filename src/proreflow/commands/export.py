"""``proreflow export``: a trained Stable Diffusion student as a diffusers pipeline folder or LoRA weights.

    proreflow export --run runs/sd15 --out exports/sd15-4w            # full pipeline folder
    proreflow export --run runs/sd15 --out exports/sd15-lora --lora   # LoRA for the base model
    proreflow export --run runs/sd15 --out exports/sd15-4w --dtype float16 --eval evals/sd15 \
        --push-to-hub me/sd15-proreflow-4step

The folders load with diffusers alone (a stock DDIMScheduler is the student's sampler, see
:mod:`proreflow.sd.export`) and carry a model card (README.md).
"""

from __future__ import annotations

import argparse

from . import UsageError, bounded_int, existing_dir, writable_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="output folder of a `proreflow train` run (stable-diffusion setup)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--teacher", help="teacher pipeline folder or hub id (default: the one the run was trained from)")
    p.add_argument("--lora", action="store_true",
                   help="write LoRA weights (pipe.load_lora_weights) instead of a full pipeline")
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
    from ..sd.export import export_lora, export_pipeline, load_run_student, push_to_hub, read_metrics
    from ..sd.pipeline import load_teacher, read_model_index
    from ..sd.scheduler import TRAILING_DDIM_LINE
    from ..training.checkpoint import check_weights_file, read_student_info
    from ..training.recipes import load_recipe
    from ..training.runner import as_dtype

    run_dir = existing_dir(args.run, "--run")
    info_path = run_dir / "student.json"
    if not info_path.is_file():
        raise UsageError(f"--run: {info_path} not found; --run takes the output folder of a finished "
                         "`proreflow train` run")
    try:
        info = read_student_info(run_dir)
    except ValueError as err:
        raise UsageError(f"--run: {err}") from None
    check_weights_file(run_dir / "student.safetensors", UsageError)
    source = args.teacher or info.get("info", {}).get("teacher")
    if not source:
        raise UsageError("the run does not name its teacher; pass --teacher")
    metrics = None
    if args.eval:
        try:
            metrics = read_metrics(args.eval)
        except FileNotFoundError as err:
            raise UsageError(f"--eval: {err}") from None
    writable_dir(args.out)
    read_model_index(source, args.local_files_only)  # a wrong teacher fails before anything loads
    teacher = load_teacher(source, local_files_only=args.local_files_only)
    student, info = load_run_student(run_dir, teacher.unet)
    extra = {"run": str(run_dir), "recipe": info.get("recipe"), "stage": info.get("stage"),
             "guidance_mode": info.get("guidance_mode"), "global_step": info.get("global_step")}
    if (run_dir / "recipe.yaml").is_file():  # the guidance of the teacher the final student reproduces
        extra["teacher_guidance"] = load_recipe(run_dir / "recipe.yaml").stages[-1].guidance
    if args.push_to_hub:
        extra["repo_id"] = args.push_to_hub  # the model card's loading lines name the repo
    dtype = as_dtype(args.dtype) if args.dtype else None
    windows, guidance = info["windows"], info.get("guidance", 1.0)
    if args.lora:
        path, kept = export_lora(student, teacher, args.out, windows, guidance, args.lora_rank, extra, dtype, metrics)
        print(f"wrote {path} and its kohya / ComfyUI copy (LoRA for {source}; keeps {kept:.1%} of the weight "
              f"change). Sample with `pipe.load_lora_weights(DIR)`, then\n  {TRAILING_DDIM_LINE}\n"
              f"and num_inference_steps={windows}")
    else:
        export_pipeline(student, teacher, args.out, windows, guidance, extra, dtype, metrics)
        print(f"wrote the pipeline folder {args.out} ({windows} windows; sample with num_inference_steps={windows}, "
              f"or `proreflow sample --model {args.out} --prompt ...`)")
    if args.push_to_hub:
        print(f"uploaded to {push_to_hub(args.out, args.push_to_hub, private=args.private)}")
    return 0
