"""``proreflow sample``: images from an exported student pipeline (or a base pipeline with LoRA).

    proreflow sample --model exports/sd15-4w --prompt "a cat" --steps 4 --out samples/
    proreflow sample --model BASE --lora exports/sd15-lora --prompt "a cat" --steps 4
    proreflow sample --model exports/sd3-4w --prompt "a cat" --out samples/

The family comes from the pipeline's ``model_index.json``: Stable Diffusion / SDXL sample with
:class:`~proreflow.sd.ProReflowScheduler`, SD3 with its stock Euler scheduler at the student's
sigmas (:func:`proreflow.sd3.export.student_sigmas`).

Image ``k`` of prompt ``i`` uses seed ``seed + i * num_images + k``: a set of images can be
made again one by one. Files: ``OUT/<i>-<k>.png`` and ``OUT/prompts.txt``.
"""

from __future__ import annotations

import argparse

from . import UsageError, bounded_int, check_device, existing_dir, existing_file, finite_float, one_line, writable_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="exported pipeline folder (`proreflow export`), or the base "
                   "pipeline (folder or hub id) of --lora")
    p.add_argument("--lora", help="LoRA folder from `proreflow export --lora`")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts", help="file with one prompt per line")
    p.add_argument("--steps", type=bounded_int(1, 1000),
                   help="sampling steps (default: one per window; fewer steps span whole windows, as DDIM with that "
                        "many steps; SD3 students: at least one per window)")
    p.add_argument("--windows", type=bounded_int(1, 1024), help="the student's windows (default: from the export)")
    p.add_argument("--guidance", type=finite_float(0, 100),
                   help="classifier-free guidance (default: the export's; 1 = none)")
    p.add_argument("--num-images", type=bounded_int(1, 256), default=1, help="images per prompt")
    p.add_argument("--seed", type=bounded_int(0, 2**63 - 1), default=0)
    p.add_argument("--height", type=bounded_int(8, 4096), help="image height in px (a multiple of 8)")
    p.add_argument("--width", type=bounded_int(8, 4096), help="image width in px (a multiple of 8)")
    p.add_argument("--out", default="samples", help="output folder (default: samples)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on GPU, float32 on CPU")
    p.add_argument("--local-files-only", action=argparse.BooleanOptionalAction, default=None)


def _check_lora(folder: str) -> dict:
    """The ``proreflow.json`` of a LoRA folder, after checking that it holds LoRA weights."""
    from ..sd.export import read_export_info

    path = existing_dir(folder, "--lora", "folder")
    if not (path / "pytorch_lora_weights.safetensors").is_file():
        raise UsageError(f"--lora: {path} holds no pytorch_lora_weights.safetensors; give a folder written by "
                         "`proreflow export --lora`")
    try:
        return read_export_info(path)
    except ValueError as err:
        raise UsageError(f"--lora: {path / 'proreflow.json'} is not valid JSON ({err})") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from ..sd.captions import read_prompts
    from ..sd.pipeline import read_model_index
    from ..training.environment import as_dtype
    from .named_setups import family_of_pipeline, load

    prompts = list(args.prompt) + (read_prompts(existing_file(args.prompts, "--prompts")) if args.prompts else [])
    if not prompts:
        raise UsageError("give --prompt TEXT (repeatable) or --prompts FILE")
    for option, size in (("--height", args.height), ("--width", args.width)):
        if size is not None and size % 8:
            raise UsageError(f"{option}: {size} is not a multiple of 8 (the VAE's factor)")
    device = torch.device(check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    dtype = as_dtype(args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    lora_info = _check_lora(args.lora) if args.lora else {}
    try:  # a wrong --model fails before anything loads
        index = read_model_index(args.model, args.local_files_only)
    except OSError as err:
        raise UsageError(f"--model: {one_line(err).replace('--teacher takes', '--model takes')}") from None
    found = family_of_pipeline(index.get("_class_name"))
    if found is None or found[1].student_pipeline is None:
        raise UsageError(f"--model: {args.model} is a {index.get('_class_name')}; sample takes Stable Diffusion, SDXL "
                         "or SD3 pipelines (exported by `proreflow export`, or the base of --lora)")
    family = found[1]
    out = writable_dir(args.out)
    try:
        pipe, info = load(family.student_pipeline)(args.model, args.lora, args.windows, dtype, device,
                                                   args.local_files_only)
    except (ValueError, RuntimeError, KeyError) as err:
        if not args.lora:
            raise
        base = lora_info.get("base")
        raise UsageError(f"--lora {args.lora} does not fit --model {args.model}: the LoRA was exported for the base "
                         f"{base!r} (its proreflow.json); give that pipeline as --model" if base else
                         f"--lora {args.lora} does not fit --model {args.model} ({one_line(err)[:200]})") from None
    windows, steps, schedule = load(family.sample_schedule)(pipe, info, args)
    guidance = args.guidance if args.guidance is not None else info.get("guidance", 1.0)
    out.mkdir(parents=True, exist_ok=True)
    n = args.num_images
    for i, prompt in enumerate(prompts):
        generators = [torch.Generator().manual_seed(args.seed + i * n + k) for k in range(n)]
        images = pipe(prompt, guidance_scale=guidance, num_images_per_prompt=n, **schedule,
                      generator=generators, height=args.height, width=args.width).images
        for k, image in enumerate(images):
            image.save(out / f"{i:03d}-{k}.png")
    (out / "prompts.txt").write_text("".join(f"{i:03d}\t{p}\n" for i, p in enumerate(prompts)))
    print(f"wrote {len(prompts) * n} images to {out} ({steps} steps, {windows} windows, guidance {guidance})")
    return 0


def sd_schedule(pipe, info: dict, args: argparse.Namespace) -> tuple[int, int, dict]:
    """Stable Diffusion / SDXL: the student's windows (its ProReflowScheduler's), the step count and the call's
    ``num_inference_steps``."""
    windows = pipe.scheduler.config.num_windows
    steps = args.steps or windows
    return windows, steps, {"num_inference_steps": steps}


def sd3_schedule(pipe, info: dict, args: argparse.Namespace) -> tuple[int, int, dict]:
    """SD3: the student's windows (``proreflow.json``), the step count and the stock Euler scheduler's ``sigmas``
    for it (:func:`proreflow.sd3.export.student_sigmas`)."""
    from ..sd3.export import student_sigmas

    windows = info["num_windows"]
    steps = args.steps or windows
    if steps < windows:  # a VP student takes fewer steps than windows (TimeWindows.for_steps)
        raise UsageError(f"--steps {steps}: the SD3 student has {windows} windows; sample with at least {windows} "
                         "steps")
    if args.height != args.width and pipe.scheduler.config.get("use_dynamic_shifting"):
        raise UsageError("--height and --width differ, but the SD3 scheduler shifts by the image size: give a "
                         "square size (--height = --width)")
    return windows, steps, {"sigmas": student_sigmas(pipe, info, steps, args.height or args.width)}
