"""``proreflow export``: a trained Stable Diffusion student as a diffusers pipeline folder or LoRA weights.

    proreflow export --run runs/sd15 --out exports/sd15-4w            # full pipeline folder
    proreflow export --run runs/sd15 --out exports/sd15-lora --lora   # LoRA for the base model
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="output folder of a `proreflow train` run (stable-diffusion setup)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--teacher", help="teacher pipeline folder or hub id (default: the one the run was trained from)")
    p.add_argument("--lora", action="store_true",
                   help="write LoRA weights (pipe.load_lora_weights) instead of a full pipeline")
    p.add_argument("--lora-rank", type=int, default=64,
                   help="rank when extracting LoRA from a fully fine-tuned student (default 64)")
    p.add_argument("--local-files-only", action=argparse.BooleanOptionalAction, default=None,
                   help="never download (default: on when HF_HUB_OFFLINE=1)")


def run(args: argparse.Namespace) -> int:
    from ..sd.export import export_lora, export_pipeline, load_run_student
    from ..sd.pipeline import load_teacher
    from ..training.checkpoint import read_student_info

    run_dir = Path(args.run)
    info_path = run_dir / "student.json"
    if not info_path.is_file():
        raise SystemExit(f"proreflow export: {info_path} not found; --run takes the output folder of a "
                         "finished `proreflow train` run")
    info = read_student_info(run_dir)
    source = args.teacher or info.get("info", {}).get("teacher")
    if not source:
        raise SystemExit("proreflow export: the run does not name its teacher; pass --teacher")
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
