"""Export a trained Stable Diffusion student as files anyone with diffusers can load.

Pipeline export (:func:`export_pipeline`): the teacher's pipeline (VAE, tokenizers, text
encoders, its class: StableDiffusion / StableDiffusionXL) with the student's UNet and diffusers'
own ``DDIMScheduler`` set to the student's sampler (:func:`~proreflow.sd.scheduler.trailing_ddim`),
saved with ``save_pretrained``. It loads with ``StableDiffusionPipeline.from_pretrained(DIR)``
(or the XL one) where proreflow is not installed; sample with ``num_inference_steps`` equal to
the student's windows. That DDIM is :func:`proreflow.sample`'s sampler: the same timesteps
(``t * T - 1``, :mod:`proreflow.schedules`) and schedule, so the images agree up to float rounding
when the windows divide ``T`` (``tests/sd/test_sd_export.py`` checks it in a Python without
proreflow). Other window counts, and more steps than windows, take the opt-in line
:data:`~proreflow.sd.scheduler.PROREFLOW_LINE`.

LoRA export (:func:`export_lora`): ``pytorch_lora_weights.safetensors`` (diffusers / peft keys)
for ``pipe.load_lora_weights(DIR)`` on the base pipeline or a fine-tune of it, used with
:data:`~proreflow.sd.scheduler.TRAILING_DDIM_LINE` (the base pipeline's own scheduler,
e.g. SD1.5's PNDM, is another sampler); and ``lora_kohya.safetensors``, the same weights with
kohya keys (``lora_unet_<module>.lora_down/.lora_up/.alpha``, diffusers'
``convert_state_dict_to_kohya``), the format AUTOMATIC1111 and ComfyUI load.

Both write ``proreflow.json`` (windows, the guidance to sample with, 1 when guidance was baked
in, the guidance of the teacher the student reproduces, where it came from) and a model card
``README.md``; ``dtype`` saves the weights in float16 / bfloat16; :func:`push_to_hub` uploads
the folder.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..training.checkpoint import check_finite
from ..training.student import read_student_info, trained_student
from .lora import LORA_TARGETS, add_lora, as_lora, has_lora, merge_lora, save_kohya_lora, save_lora
from .scheduler import PROREFLOW_LINE, TRAILING_DDIM_LINE, ProReflowScheduler, explicit_config, trailing_ddim

EXPORT_INFO = "proreflow.json"
MODEL_CARD = "README.md"
KOHYA_LORA = "lora_kohya.safetensors"
FAMILY_TAGS = {"StableDiffusionXLPipeline": "stable-diffusion-xl", "PixArtAlphaPipeline": "pixart-alpha",
               "PixArtSigmaPipeline": "pixart-sigma"}
"""The model card's family tag of an exported pipeline class (default ``stable-diffusion``)."""


def read_export_info(folder: str | Path) -> dict[str, Any]:
    """``proreflow.json`` of an exported pipeline or LoRA folder ({} if absent)."""
    path = Path(folder) / EXPORT_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def write_export_info(out_dir: Path, info: dict, metrics: list[dict] | None, usage: list[str] | None = None,
                      tag: str | None = None) -> None:
    """Write an export's ``proreflow.json`` (``info``) and its model card (``README.md``)."""
    (out_dir / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    (out_dir / MODEL_CARD).write_text(model_card(info, metrics, usage, tag))


def read_metrics(eval_dir: str | Path) -> list[dict]:
    """The result rows of a ``proreflow eval`` output folder (its ``results.json``)."""
    path = Path(eval_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --eval takes the --out folder of a `proreflow eval` run")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["results"]
    except (ValueError, KeyError, TypeError):
        rows = None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
        raise ValueError(f"{path} is not the results file of a `proreflow eval` run (a JSON object whose "
                         "'results' lists named rows)")
    return rows


def model_card(info: dict, metrics: list[dict] | None = None, usage: list[str] | None = None,
               tag: str | None = None) -> str:
    """The export's ``README.md``: hub metadata, the lines that load and sample it, how it was trained,
    and the ``proreflow eval`` results when given (rows of its ``results.json``).

    usage: the lines of its "Use it with diffusers alone" section (default: Stable Diffusion's, the stock
    DDIM); tag: the model family's hub tag (default: ``stable-diffusion`` or ``stable-diffusion-xl``).
    """
    from huggingface_hub import ModelCardData

    from .pipeline import _looks_like_hub_id

    lora, windows, guidance = "base" in info, info["num_windows"], info["guidance"]
    teacher = info["base"] if lora else info["teacher"]
    pipeline = info.get("pipeline", "StableDiffusionPipeline")
    tag = tag or FAMILY_TAGS.get(pipeline, "stable-diffusion")
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image",
                         tags=["proreflow", "distillation", "text-to-image", tag] + (["lora"] if lora else []),
                         base_model=teacher if _looks_like_hub_id(teacher) else None)
    what = "LoRA weights" if lora else "A diffusers pipeline"
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# ProReflow student of `{teacher}`", "",
        f"{what} distilled with proreflow (ProReflow: progressive reflow, aligned v-prediction): "
        f"a {windows}-step sampler. Sample with **{windows} steps** at guidance **{guidance:g}**"
        + (" (the teacher's guidance is baked in)." if guidance == 1.0 else "."), "",
        "## Use it with diffusers alone", "", *(usage if usage is not None else _sd_usage(info)),
    ]
    rows = [("teacher", f"`{teacher}`"), ("recipe", info.get("recipe")), ("stage", info.get("stage")),
            ("windows (steps)", windows), ("guidance to sample with", f"{guidance:g}"),
            ("resolution to sample at (height = width)", info.get("resolution")),
            ("teacher guidance it reproduces", info.get("teacher_guidance")),
            ("prediction type", info.get("prediction_type")), ("weights dtype", info.get("dtype", "float32"))]
    if lora:
        rows.append(("LoRA kept fraction of the weight change", f"{info.get('lora_kept_fraction', 1.0):.4f}"))
    if info.get("served_steps"):
        rows.append(("step counts the trained student serves (one export each: `proreflow export --steps N`)",
                     " / ".join(map(str, info["served_steps"]))))
    lines += ["## Training", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows if value is not None]
    if metrics:
        from .t2i import _cell, shown_columns

        columns = shown_columns(metrics)
        lines += ["", "## Evaluation (`proreflow eval`)", "",
                  "| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row.get(key)) for _, key in columns) + " |" for row in metrics
                  if not row.get("skipped")]
    return "\n".join(lines) + "\n"


def _sd_usage(info: dict) -> list[str]:
    """The model card's usage section of a Stable Diffusion / SDXL export: the stock DDIM line."""
    lora, windows, guidance = "base" in info, info["num_windows"], info["guidance"]
    teacher = info["base"] if lora else info["teacher"]
    pipeline = info.get("pipeline", "StableDiffusionPipeline")
    here = info.get("repo_id", "THIS_FOLDER")
    load = (f'pipe = {pipeline}.from_pretrained("{teacher}", dtype=torch.float16).to("cuda")\n'
            f'pipe.load_lora_weights("{here}")\n' + TRAILING_DDIM_LINE if lora else
            f'pipe = {pipeline}.from_pretrained("{here}", dtype=torch.float16).to("cuda")\n'
            f"# the scheduler is already DDIMScheduler(timestep_spacing='trailing', set_alpha_to_one=False, ...)")
    lines = [
        "```python", "import torch", f"from diffusers import DDIMScheduler, {pipeline}", "", load,
        f'image = pipe("a photo of a cat", num_inference_steps={windows}, guidance_scale={guidance:g}).images[0]',
        "```",
        "",
        f"The DDIM line is the student's sampler at `num_inference_steps={windows}` (one step per window); "
        + ("without it the base pipeline's own scheduler samples something else. " if lora else "")
        + "It is proreflow's own sampler when the windows divide the schedule's 1000 steps (the same "
          "timesteps `t * 1000 - 1`); for other window counts, or more steps than windows, use proreflow's "
          "scheduler:", "",
        "```python", "from proreflow.sd import ProReflowScheduler", PROREFLOW_LINE.format(windows=windows),
        "```",
        "",
    ]
    if lora:
        lines += [f"`{KOHYA_LORA}` holds the same weights with kohya keys (`lora_unet_...`, `.alpha`), the "
                  "format AUTOMATIC1111 and ComfyUI load; sample it with DDIM at "
                  f"{windows} steps on trailing timesteps.", ""]
    return lines


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload an export folder to the Hugging Face hub (``create_repo`` + ``upload_folder``); the repo's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                      commit_message="Upload ProReflow student (proreflow export)")
    return str(url)


def load_run_student(run_dir: str | Path, base: nn.Module,
                     model: str = "stable-diffusion", steps: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The final (EMA) student network of a training run of the setup ``model`` (``stable-diffusion``,
    ``pixart``: a UNet or a transformer; ``stable-diffusion-3``: a transformer), and its ``student.json``.

    Rebuilt as the run built it: a copy of the teacher's network ``base`` (with LoRA layers when the
    run trained LoRA), then the saved weights in the teacher's dtype. A LoRA run's files hold the
    LoRA weights (float32) and not the frozen base, which is the teacher's: the copy keeps
    ``base``'s own weights (float32 as loaded, not the bf16 copy a bf16 run trained against), so a
    merged export folds the LoRA into them. Loaded by the one student loader,
    :func:`~proreflow.training.student.trained_student`, as :func:`proreflow.training.load_student` loads a run
    with its whole ``DistillationSetup``; export has only the teacher's pipeline.

    steps: the window count to fold a step-conditioned (any-step) student at
    (:func:`~proreflow.step_conditioning.fold_step_count`): the network is then the stock one, and the returned
    info's ``windows`` is ``steps``. Required for such a student, refused for any other.
    """
    run_dir = Path(run_dir)
    info_path, weights = run_dir / "student.json", run_dir / "student.safetensors"
    if not info_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{run_dir} holds no trained student (student.json / student.safetensors); "
                                "give the output folder of a finished `proreflow train` stage")
    info = read_student_info(run_dir)
    setup_info = info.get("info", {})
    if setup_info.get("model") != model:
        raise ValueError(f"{run_dir} is a {setup_info.get('model', 'built-in data')!r} run, not a {model!r} one")
    network = copy.deepcopy(base).requires_grad_(True)  # every weight was trained, or (LoRA) ...
    if setup_info.get("lora_rank"):
        targets = LORA_TARGETS[setup_info.get("lora_targets") or "attention"]
        add_lora(network, setup_info["lora_rank"], setup_info.get("lora_alpha"), targets)  # ... the LoRA layers only
    if info.get("step_counts"):
        served = info.get("served_windows") or info["step_counts"]
        if steps is None:
            raise ValueError(f"{run_dir} holds a student for {'/'.join(map(str, served))} steps (step-conditioned): "
                             "choose one with --steps N")
        if steps not in served:
            raise ValueError(f"--steps {steps}: the student of {run_dir} was trained for "
                             f"{'/'.join(map(str, served))} steps; choose one of those")
    elif steps is not None and steps != info["windows"]:
        raise ValueError(f"--steps {steps}: the student of {run_dir} is not step-conditioned; it has "
                         f"{info['windows']} windows: drop --steps")
    return trained_student(run_dir, network, steps=steps if info.get("step_counts") else None)


def export_pipeline(student_unet: nn.Module, teacher, out_dir: str | Path, num_windows: int,
                    guidance: float = 1.0, extra: dict | None = None, dtype: torch.dtype | None = None,
                    metrics: list[dict] | None = None, component: str = "unet") -> Path:
    """Save the teacher's pipeline with ``student_unet`` and the stock DDIM of the student (module doc).

    teacher: a :class:`~proreflow.sd.pipeline.VPPipelineTeacher` (an ``SDTeacher``, a ``PixArtTeacher``:
    its pipeline's other components are saved). component: the pipeline's denoiser that the student
    replaces (``unet``; PixArt's ``transformer``). A LoRA student is merged into plain weights first.
    dtype: of the saved weights (default: as they are). metrics: ``proreflow eval`` rows for the model card.
    """
    out_dir = Path(out_dir)
    unet = merge_lora(copy.deepcopy(student_unet)) if has_lora(student_unet) else student_unet
    check_finite(unet.state_dict(), f"refusing to export the student {component}")
    pipe = copy.copy(teacher.pipe)  # shares the components, leaves the teacher's pipeline as it was
    pipe.register_modules(**{component: unet}, scheduler=trailing_ddim(pipe.scheduler.config))
    if dtype is not None:
        pipe.register_modules(**{name: copy.deepcopy(module).to(dtype) for name, module in pipe.components.items()
                                 if isinstance(module, nn.Module)})
    pipe.save_pretrained(out_dir, safe_serialization=True)
    info = {"num_windows": num_windows, "guidance": guidance, "prediction_type": teacher.prediction_type,
            "teacher": teacher.source, "pipeline": type(teacher.pipe).__name__, "scheduler": TRAILING_DDIM_LINE,
            "dtype": str(dtype or unet.dtype).removeprefix("torch."), **(extra or {})}
    write_export_info(out_dir, info, metrics)
    return out_dir


def export_lora(student_unet: nn.Module, teacher, out_dir: str | Path, num_windows: int, guidance: float = 1.0,
                rank: int = 64, extra: dict | None = None, dtype: torch.dtype | None = None,
                metrics: list[dict] | None = None) -> tuple[Path, float]:
    """Save the student as LoRA weights for the teacher's pipeline, in diffusers' and kohya's keys (module doc).

    A LoRA student is saved as trained (kept fraction 1); a fully fine-tuned one is extracted
    at ``rank`` by SVD (:func:`~proreflow.sd.lora.extract_lora`). Returns the diffusers
    weights file and the kept fraction of the weight change.
    """
    out_dir = Path(out_dir)
    adapted, kept = as_lora(student_unet, teacher.unet, rank)
    path = save_lora(adapted, out_dir, type(teacher.pipe).__name__, "unet", dtype)
    save_kohya_lora(adapted, out_dir / KOHYA_LORA, dtype)
    info = {"num_windows": num_windows, "guidance": guidance, "prediction_type": teacher.prediction_type,
            "base": teacher.source, "pipeline": type(teacher.pipe).__name__, "scheduler": TRAILING_DDIM_LINE,
            "lora_kept_fraction": kept, "kohya_weights": KOHYA_LORA,
            "dtype": str(dtype or torch.float32).removeprefix("torch."), **(extra or {})}
    write_export_info(out_dir, info, metrics)
    return path, kept


def load_student_pipeline(model: str | Path, lora: str | Path | None = None, num_windows: int | None = None,
                          dtype=None, device=None, local_files_only: bool | None = None):
    """A diffusers pipeline that samples a student with :class:`ProReflowScheduler`.

    model: an exported pipeline folder, or (with ``lora``) the base pipeline the LoRA belongs to.
    num_windows: default from ``proreflow.json`` (of the LoRA folder, then of the model) or the
    pipeline's ProReflowScheduler config.
    """
    from .pipeline import apply_lora, open_pipeline

    pipe = open_pipeline(model, dtype, local_files_only=local_files_only, what="student pipeline")
    info = {**read_export_info(model), **(read_export_info(lora) if lora else {})}
    if lora:
        apply_lora(pipe, lora)
    num_windows = num_windows or info.get("num_windows") or pipe.scheduler.config.get("num_windows")
    if not num_windows:
        raise ValueError(f"the student's number of windows is unknown: {model} is not an exported student "
                         "and no proreflow.json says it; pass num_windows (--windows)")
    pipe.scheduler = ProReflowScheduler.from_config(explicit_config(pipe.scheduler.config), num_windows=num_windows)
    if device is not None:
        pipe.to(device)
    return pipe, info
