"""``proreflow export``: a trained Stable Diffusion student as a diffusers pipeline folder or LoRA weights.

    proreflow export --run runs/sd15 --out exports/sd15-4w            # full pipeline folder
    proreflow export --run runs/sd15 --out exports/sd15-lora --lora   # LoRA for the base model
"""

from __future__ import annotations

import argparse
import json

from . import UsageError, bounded_int, existing_dir, writable_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="output folder of a `proreflow train` run (stable-diffusion setup)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--teacher", help="teacher pipeline folder or hub id (default: the one the run was trained from)")
    p.add_argument("--lora", action="store_true",
                   help="write LoRA weights (pipe.load_lora_weights) instead of a full pipeline")
    p.add_argument("--lora-rank", type=bounded_int(1, 4096), default=64,
                   help="rank when extracting LoRA from a fully fine-tuned student (default 64)")
    p.add_argument("--local-files-only", action=argparse.BooleanOptionalAction, default=None,
                   help="never download (default: on when HF_HUB_OFFLINE=1)")


def run(args: argparse.Namespace) -> int:
    from ..diffusers.export import export_lora, export_pipeline, load_run_student
    from ..models.stable_diffusion import load_teacher, read_model_index
    from ..training.checkpoint import check_weights_file

    run_dir = existing_dir(args.run, "--run")
    info_path = run_dir / "student.json"
    if not info_path.is_file():
        raise UsageError(f"--run: {info_path} not found; --run takes the output folder of a finished "
                         "`proreflow train` run")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UsageError(f"--run: {info_path} is not valid JSON ({err}); the run's files are damaged") from None
    if not isinstance(info, dict) or not isinstance(info.get("info", {}), dict) or "windows" not in info:
        raise UsageError(f"--run: {info_path} is not a student record of `proreflow train`")
    check_weights_file(run_dir / "student.safetensors", UsageError)
    source = args.teacher or info.get("info", {}).get("teacher")
    if not source:
        raise UsageError("the run does not name its teacher; pass --teacher")
    writable_dir(args.out)
    read_model_index(source, args.local_files_only)  # a wrong teacher fails before anything loads
    teacher = load_teacher(source, local_files_only=args.local_files_only)
    student, info = load_run_student(run_dir, teacher.unet)
    extra = {"run": str(run_dir), "recipe": info.get("recipe"), "stage": info.get("stage")}
    if args.lora:
        path, kept = export_lora(student, teacher, args.out, info["windows"], info.get("guidance", 1.0),
                                 args.lora_rank, extra)
        print(f"wrote {path} (LoRA for {source}; keeps {kept:.1%} of the weight change)")
    else:
        export_pipeline(student, teacher, args.out, info["windows"], info.get("guidance", 1.0), extra)
        print(f"wrote the pipeline folder {args.out} ({info['windows']} windows; sample with "
              f"`proreflow sample --model {args.out} --prompt ...`)")
    return 0
