"""Evaluate a few-step student against its teacher, as the paper does: FID, CLIP score and fidelity.

A method is a :class:`PromptSampler`: a name, a step count and ``generate(noise, prompts) -> images``
(N x C x H x W in [0, 1]). Diffusers pipelines (:func:`pipeline_sampler`, :func:`ddim_sampler`
for the teacher) and built-in denoisers (:func:`denoiser_sampler`) both become Samplers, so the
same runner serves Stable Diffusion students and students of the built-in data.

:func:`evaluate` walks the prompts in batches; for each batch every method starts from the same
noise (row ``i`` is a function of ``(seed, i)`` only, see :func:`prompt_noise`), so teacher and
student outputs pair up image by image. Per method it reports FID against reference images,
CLIP score, and fidelity to the teacher: FID between the two output sets, and the paired pixel
distance of outputs from the same noise and prompt, as RMSE (pixels in [0, 1];
:func:`proreflow.evaluation.fidelity.fidelity`) and PSNR. Images are quantised to uint8 (as
saved to PNG) before every metric.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..conditioning import Cond
from ..evaluation.fidelity import fidelity
from ..evaluation.frechet import frechet_distance
from ..sampling import sample
from ..teachers import Denoiser
from ..windows import TimeWindows
from .clip_score import NO_CLIP_MESSAGE, ClipScorer
from .fid import FID, FIDStats, to_uint8_rgb
from .grids import save_grids
from .pipeline import SDTeacher

Generate = Callable[[Tensor, Sequence[Any]], Tensor]


class Judge(Protocol):
    """A classifier of generated images (uint8 N x 3 x H x W): its features, for a Fréchet distance against
    ``reference`` (the real images' features), and its predicted class, for prompt accuracy."""

    name: str
    classes: int
    reference: Tensor

    def features(self, images: Tensor) -> Tensor: ...

    def predict(self, images: Tensor) -> Tensor: ...
PSNR_CAP = 100.0  # dB, for identical images


@dataclass
class PromptSampler:
    """A method to evaluate: ``generate(noise, prompts)`` -> N x C x H x W images in [0, 1].

    ``noise`` arrives as float32 on the CPU; ``generate`` moves it where its model runs.
    """

    name: str
    steps: int
    generate: Generate


def prompt_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> Tensor:
    """Initial noise for prompts ``indices`` (len(indices) x shape, float32, CPU).

    Row ``i`` comes from its own generator seeded with a hash of ``(seed, i)``: the same on any
    batch size, batch order or device, so every method sees the same noise for a prompt.
    """
    rows = []
    for i in indices:
        key = int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") >> 1
        rows.append(torch.randn(tuple(shape), generator=torch.Generator().manual_seed(key)))
    return torch.stack(rows)


# --- diffusers pipelines ---------------------------------------------------------------------------


def pipeline_sampler(pipe, steps: int, guidance: float, name: str, resolution: int | None = None) -> PromptSampler:
    """A diffusers SD / SDXL pipeline with its own scheduler at ``steps`` steps; the noise is its latents.

    The pipeline returns latents, decoded with :meth:`proreflow.sd.pipeline.SDTeacher.decode_latents`
    (in the VAE's own dtype: a float32 VAE beside a float16 UNet works). ``resolution``: square
    images of that many pixels (default: the pipeline's native size).
    """
    sd = SDTeacher(pipe, name)
    resolution = resolution or sd.resolution
    pipe.set_progress_bar_config(disable=True)  # the evaluation's own bar counts prompts

    def generate(noise: Tensor, prompts: Sequence[str]) -> Tensor:
        latents = pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance, height=resolution,
                       width=resolution, latents=noise.to(pipe.device, pipe.unet.dtype), output_type="latent").images
        return (sd.decode_latents(latents) + 1) / 2

    return PromptSampler(name, steps, generate)


def ddim_sampler(pipe, steps: int, guidance: float, name: str | None = None,
                 resolution: int | None = None) -> PromptSampler:
    """The teacher's DDIM: the pipeline (its components shared) with the DDIMScheduler of
    :func:`~proreflow.sd.scheduler.trailing_ddim` built from its schedule: trailing timesteps,
    no sample clipping, last step to ``alphas_cumprod[0]`` as :func:`proreflow.sample` lands; not the
    pipeline's own DDIM settings (SD1.5's are "leading", ``steps_offset`` 1, clipping inherited)."""
    from .scheduler import trailing_ddim

    ddim = type(pipe).from_pipe(pipe, scheduler=trailing_ddim(pipe.scheduler.config))
    return pipeline_sampler(ddim, steps, guidance, name or f"teacher DDIM-{steps}", resolution)


def dpm_solver_sampler(pipe, steps: int, guidance: float, name: str | None = None,
                       resolution: int | None = None) -> PromptSampler:
    """The teacher with diffusers' ``DPMSolverMultistepScheduler`` at its defaults (DPM-Solver++(2M)),
    built from the pipeline's scheduler config: the few-step solver users reach for first."""
    from diffusers import DPMSolverMultistepScheduler

    solver = type(pipe).from_pipe(pipe, scheduler=DPMSolverMultistepScheduler.from_config(pipe.scheduler.config))
    return pipeline_sampler(solver, steps, guidance, name or f"teacher DPM-Solver++ {steps}", resolution)


# --- built-in denoisers ----------------------------------------------------------------------------


def denoiser_sampler(denoiser: Denoiser, windows: TimeWindows, steps: int, name: str, *, uncond: Cond = None,
                     guidance: float = 1.0, condition: Callable[[Sequence[Any]], Cond] | None = None,
                     decode: Callable[[Tensor], Tensor] | None = None,
                     device: str | torch.device = "cpu") -> PromptSampler:
    """A built-in student or teacher through :func:`proreflow.sample` (``TimeWindows(n)`` with ``n`` steps is DDIM).

    condition: a batch of prompt items -> the network's condition (default: the items as a tensor,
        e.g. class labels; all-None items give no condition).
    decode: samples -> images in [0, 1] (default: ``(x + 1) / 2``, clamped).
    """

    def generate(noise: Tensor, prompts: Sequence[Any]) -> Tensor:
        if condition is not None:
            cond = condition(prompts)
        else:
            cond = None if all(p is None for p in prompts) else torch.as_tensor(list(prompts), device=device)
        x = sample(denoiser, noise.to(device), windows, steps, cond, uncond, guidance)
        return decode(x) if decode is not None else ((x.float() + 1) / 2).clamp(0, 1)

    return PromptSampler(name, steps, generate)


# --- the runner ------------------------------------------------------------------------------------


@dataclass
class MethodResult:
    """One method's numbers (None: not computed). Fidelity columns compare with the teacher's outputs."""

    name: str
    steps: int
    images: int = 0
    seconds_per_image: float | None = None
    fid: float | None = None
    clip_score: float | None = None
    fd: float | None = None
    accuracy: float | None = None
    fid_to_teacher: float | None = None
    rmse_to_teacher: float | None = None
    psnr_to_teacher: float | None = None
    skipped: str | None = None


@dataclass
class Evaluation:
    """Results (teacher first), the first prompts' samples per method (uint8) and notes for the reader."""

    results: list[MethodResult]
    samples: dict[str, Tensor]
    sample_prompts: list[Any]
    notes: list[str] = field(default_factory=list)


def psnr(images: Tensor, reference: Tensor) -> Tensor:
    """Per-image PSNR (dB, capped at ``PSNR_CAP`` for identical images) between two uint8 batches."""
    mse = (images.float() - reference.float()).div(255).square().flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp(min=10 ** (-PSNR_CAP / 10)))


def _run(sampler: PromptSampler, noise: Tensor, prompts: Sequence[Any]) -> tuple[Tensor, float]:
    start = time.perf_counter()
    images = to_uint8_rgb(sampler.generate(noise, prompts).cpu())
    return images, time.perf_counter() - start


def evaluate(teacher: PromptSampler, students: Sequence[PromptSampler], prompts: Sequence[Any],
             noise_shape: Sequence[int], *,
             seed: int = 0, batch_size: int = 16, fid: FID | None = None, reference: FIDStats | None = None,
             clip: ClipScorer | None = None, judge: Judge | None = None, labels: Sequence[int] | None = None,
             sample_count: int = 8, progress: bool = True) -> Evaluation:
    """Generate every prompt with every method from the same noise and score the outputs.

    teacher: the reference method (e.g. :func:`ddim_sampler` at 32 steps); students: the others.
    prompts: what ``generate`` receives (captions; class labels for built-in data). CLIP score
        needs ``clip`` and string prompts. fid: FID network, for FID against ``reference``
        statistics (if given) and FID to the teacher. judge: a classifier (:class:`Judge`): ``fd``, the
        Fréchet distance of its features to ``judge.reference``, and, with ``labels`` (the class each
        prompt names), ``accuracy``, the share of images classified as their prompt's class.
        sample_count: samples kept for grids.

    Each method is first tried on one prompt (this also warms it up, so timings exclude set-up);
    a student that rejects its step count with a ``ValueError`` is reported as skipped.
    """
    if len(prompts) < 1:
        raise ValueError("no prompts to evaluate")
    names = [teacher.name, *(s.name for s in students)]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    if (fid is not None or judge is not None) and len(prompts) < 2:
        raise ValueError("FID needs at least 2 prompts")
    if labels is not None and len(labels) != len(prompts):
        raise ValueError(f"{len(labels)} labels for {len(prompts)} prompts")
    notes: list[str] = []
    methods, results = [teacher], {teacher.name: MethodResult(teacher.name, teacher.steps)}
    first = prompt_noise(seed, [0], noise_shape)
    _run(teacher, first, prompts[:1])
    for student in students:
        results[student.name] = MethodResult(student.name, student.steps)
        try:
            _run(student, first, prompts[:1])
            methods.append(student)
        except ValueError as err:
            results[student.name].skipped = str(err)
            notes.append(f"{student.name} skipped: {err}")
    use_clip = clip is not None and all(isinstance(p, str) for p in prompts)
    accumulators = {m.name: fid.accumulator() for m in methods} if fid is not None else {}
    sums = {m.name: {"clip": 0.0, "rmse": 0.0, "psnr": 0.0, "seconds": 0.0, "correct": 0.0} for m in methods}
    judged: dict[str, list[Tensor]] = {m.name: [] for m in methods}
    samples: dict[str, list[Tensor]] = {m.name: [] for m in methods}
    with tqdm(total=len(prompts), desc="evaluate", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            indices = list(range(start, min(start + batch_size, len(prompts))))
            batch = [prompts[i] for i in indices]
            noise = prompt_noise(seed, indices, noise_shape)
            text = clip.encode_text(batch) if use_clip else None
            teacher_images = None
            for method in methods:
                images, seconds = _run(method, noise, batch)
                acc = sums[method.name]
                acc["seconds"] += seconds
                if teacher_images is None:
                    teacher_images = images
                else:
                    acc["rmse"] += fidelity(images.float() / 255, teacher_images.float() / 255) * len(indices)
                    acc["psnr"] += float(psnr(images, teacher_images).sum())
                if use_clip:
                    acc["clip"] += float(clip.score_embeddings(clip.encode_images(images), text).sum())
                if fid is not None:
                    accumulators[method.name].update(images)
                if judge is not None:
                    judged[method.name].append(judge.features(images))
                    if labels is not None:
                        truth = torch.as_tensor([labels[i] for i in indices])
                        acc["correct"] += float((judge.predict(images).cpu() == truth).sum())
                if start < sample_count:
                    samples[method.name].append(images[: sample_count - start])
            bar.update(len(indices))
    n = len(prompts)
    stats = {name: acc.stats() for name, acc in accumulators.items()}
    for method in methods:
        r, acc = results[method.name], sums[method.name]
        r.images, r.seconds_per_image = n, acc["seconds"] / n
        r.clip_score = acc["clip"] / n if use_clip else None
        if method is not teacher:
            r.rmse_to_teacher, r.psnr_to_teacher = acc["rmse"] / n, acc["psnr"] / n
        if judge is not None:
            r.fd = frechet_distance(torch.cat(judged[method.name]), judge.reference)
            r.accuracy = acc["correct"] / n if labels is not None else None
        if fid is not None:
            r.fid = fid.distance(reference, stats[method.name]) if reference is not None else None
            r.fid_to_teacher = fid.distance(stats[teacher.name], stats[method.name]) if method is not teacher else None
    if clip is None:
        notes.append(NO_CLIP_MESSAGE)
    elif not use_clip:
        notes.append("CLIP score not computed: the prompts are not text.")
    if fid is not None and reference is None:
        notes.append("FID against real images not computed: no reference images (FID to the teacher is).")
    if fid is not None and n < 10_000:
        notes.append(f"FIDs from {n} images are biased upwards and comparable only at equal image counts "
                     "(the paper uses 30k COCO-2014 or 5k COCO-2017 images).")
    return Evaluation([results[name] for name in results], {k: torch.cat(v) for k, v in samples.items()},
                      list(prompts[:sample_count]), notes)


# --- reports ---------------------------------------------------------------------------------------

COLUMNS = [("method", "name"), ("steps", "steps"), ("FID ↓", "fid"), ("CLIP ↑", "clip_score"), ("FD ↓", "fd"),
           ("accuracy ↑", "accuracy"),
           ("FID to teacher ↓", "fid_to_teacher"), ("RMSE to teacher ↓", "rmse_to_teacher"),
           ("PSNR to teacher (dB) ↑", "psnr_to_teacher"), ("s / image", "seconds_per_image")]


JUDGE_COLUMNS = ("fd", "accuracy")
"""Columns that only a judge (``--classifier``) fills: left out of tables where no row has them."""


def shown_columns(rows: Sequence[dict]) -> list[tuple[str, str]]:
    """:data:`COLUMNS` for a table of ``rows`` (result dicts): the judge's columns only where a row has them."""
    return [(title, key) for title, key in COLUMNS
            if key not in JUDGE_COLUMNS or any(row.get(key) is not None for row in rows)]


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def results_markdown(evaluation: Evaluation, settings: dict[str, Any]) -> str:
    """The results as a markdown table, with the settings and notes."""
    lines = ["# proreflow eval", ""]
    lines += [f"- {key}: {value}" for key, value in settings.items()]
    shown = shown_columns([asdict(r) for r in evaluation.results])
    lines += ["", "| " + " | ".join(title for title, _ in shown) + " |", "|" + "---|" * len(shown)]
    for r in evaluation.results:
        if r.skipped is None:
            lines.append("| " + " | ".join(_cell(getattr(r, key)) for _, key in shown) + " |")
        else:
            lines.append(f"| {r.name} | {r.steps} | skipped: {r.skipped} |" + " |" * (len(shown) - 3))
    lines += [""] + [f"Note: {note}" for note in evaluation.notes]
    return "\n".join(lines) + "\n"


def write_report(evaluation: Evaluation, out_dir: str | Path, settings: dict[str, Any]) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``grids/`` (teacher vs students per prompt) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"settings": settings, "results": [asdict(r) for r in evaluation.results], "notes": evaluation.notes}
    for r in payload["results"]:  # JSON has no NaN / inf
        for key, value in r.items():
            if isinstance(value, float) and not math.isfinite(value):
                r[key] = None
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    paths["markdown"].write_text(results_markdown(evaluation, settings))
    save_grids(evaluation.samples, [str(p) for p in evaluation.sample_prompts], out_dir / "grids")
    paths["grids"] = out_dir / "grids"
    return paths
