"""``proreflow sample``: images from an exported student pipeline (or a base pipeline with LoRA).

    proreflow sample --model exports/sd15-4w --prompt "a cat" --steps 4 --out samples/
    proreflow sample --model BASE --lora exports/sd15-lora --prompt "a cat" --steps 4

Image ``k`` of prompt ``i`` uses seed ``seed + i * num_images + k``: a set of images can be
made again one by one. Files: ``OUT/<i>-<k>.png`` and ``OUT/prompts.txt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="exported pipeline folder (`proreflow export`), or the base "
                   "pipeline (folder or hub id) of --lora")
    p.add_argument("--lora", help="LoRA folder from `proreflow export --lora`")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts", help="file with one prompt per line")
    p.add_argument("--steps", type=int, help="sampling steps, at least the student's windows (default: one per window)")
    p.add_argument("--windows", type=int, help="the student's windows (default: from the export)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance (default: the export's; 1 = none)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--out", default="samples", help="output folder (default: samples)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on GPU, float32 on CPU")
    p.add_argument("--local-files-only", action=argparse.BooleanOptionalAction, default=None)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..sd.captions import read_prompts
    from ..sd.export import load_student_pipeline
    from ..training.runner import as_dtype

    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise SystemExit("proreflow sample: give --prompt TEXT (repeatable) or --prompts FILE")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = as_dtype(args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    pipe, info = load_student_pipeline(args.model, args.lora, args.windows, dtype, device, args.local_files_only)
    windows = pipe.scheduler.config.num_windows
    steps = args.steps or windows
    guidance = args.guidance if args.guidance is not None else info.get("guidance", 1.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = args.num_images
    for i, prompt in enumerate(prompts):
        generators = [torch.Generator().manual_seed(args.seed + i * n + k) for k in range(n)]
        images = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=n,
                      generator=generators, height=args.height, width=args.width).images
        for k, image in enumerate(images):
            image.save(out / f"{i:03d}-{k}.png")
    (out / "prompts.txt").write_text("".join(f"{i:03d}\t{p}\n" for i, p in enumerate(prompts)))
    print(f"wrote {len(prompts) * n} images to {out} ({steps} steps, {windows} windows, guidance {guidance})")
    return 0
