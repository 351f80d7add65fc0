"""Export an SD3 student as a stock ``StableDiffusion3Pipeline`` folder or as LoRA weights for its base.

Pipeline export (:func:`export_sd3_pipeline`): the teacher's pipeline with the student's transformer
(a LoRA student merged) and the teacher's own ``FlowMatchEulerDiscreteScheduler`` (its config
unchanged). LoRA export (:func:`export_sd3_lora`): ``pytorch_lora_weights.safetensors`` written by
``StableDiffusion3Pipeline.save_lora_weights(transformer_lora_layers=...)`` (peft's
``get_peft_model_state_dict``), for ``pipe.load_lora_weights(DIR)`` on the base pipeline; a fully
fine-tuned student is extracted at a rank by SVD (:func:`~proreflow.sd.lora.extract_lora`).

Both write ``proreflow.json`` and a model card (:func:`proreflow.sd.export.model_card`). The JSON holds
the custom ``sigmas`` to sample with: diffusers' unshifted ``s`` at the window edges ``e_0 .. e_{k-1}``
(the scheduler shifts them and appends sigma = 0 itself). One diffusers Euler step from
``sigma(e_i)`` to ``sigma(e_{i+1})`` is exactly one step of the student in ``t`` towards its window
end (:mod:`proreflow.flow`), so

    StableDiffusion3Pipeline.from_pretrained(DIR)(prompt, sigmas=info["sigmas"], guidance_scale=g)

reproduces ``proreflow.sample(student, noise, TimeWindows(k), k)``. With windows uniform in sigma (the
default ``window_space``) every Euler step in ``t`` is one in sigma, so more steps than windows are the
stock sampler too, at the sigmas of :func:`window_sigmas`; with windows uniform in the unshifted ``s``
only one step per window is (:func:`window_sigmas` refuses the rest).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..flow import FlowSchedule
from ..sd.export import read_export_info, write_export_info
from ..sd.lora import as_lora, has_lora, merge_lora, save_lora
from ..training.checkpoint import check_finite
from ..windows import TimeWindows
from .pipeline import PIPELINE, T5_COMPONENTS, SD3Teacher

__all__ = ["export_sd3_lora", "export_sd3_pipeline", "load_sd3_student_pipeline", "read_export_info",
           "student_sigmas", "window_sigmas"]

TAG = "stable-diffusion-3"


def window_sigmas(schedule: FlowSchedule, windows: TimeWindows, steps: int | None = None) -> list[float]:
    """``set_timesteps(sigmas=...)`` of ``proreflow.sample(student, noise, windows, steps)`` (default: one
    step per window): diffusers' unshifted ``s`` at the start of each step of ``windows.time_grid(steps)``.

    Raises ValueError for more steps than windows when the windows are not uniform in sigma (module doc).
    """
    steps = windows.count if steps is None else steps
    if steps != windows.count and schedule.t_shift != 1.0:
        raise ValueError(f"{steps} steps: a student with windows uniform in the unshifted s "
                         f"(window_space 'unshifted') is the stock Euler sampler only at one step per window; "
                         f"use {windows.count} steps")
    return schedule.unshifted(torch.tensor([t for t, _, _ in windows.time_grid(steps)], dtype=torch.float64)).tolist()


def _info(teacher: SD3Teacher, num_windows: int, guidance: float, resolution: int | None) -> dict:
    schedule = teacher.schedule(resolution)
    return {"num_windows": num_windows, "guidance": guidance, "prediction_type": "flow_velocity",
            "pipeline": PIPELINE, "window_space": schedule.window_space, "shift": schedule.shift,
            "mu": teacher.mu(resolution or teacher.resolution), "resolution": resolution or teacher.resolution,
            "use_t5": teacher.pipe.text_encoder_3 is not None,
            "sigmas": window_sigmas(schedule, TimeWindows(num_windows)), "num_inference_steps": num_windows}


def usage(info: dict) -> list[str]:
    """The model card's usage section: load (the base + LoRA, or the folder), sample at the recorded sigmas."""
    lora = "base" in info
    here = info.get("repo_id", "THIS_FOLDER")
    no_t5 = "" if info.get("use_t5", True) else ", text_encoder_3=None, tokenizer_3=None"
    load = [f'pipe = {PIPELINE}.from_pretrained("{info["base"] if lora else here}"{no_t5}, '
            'dtype=torch.float16).to("cuda")']
    if lora:
        load.append(f'pipe.load_lora_weights("{here}")')
    return [
        "```python", "import torch", f"from diffusers import {PIPELINE}", "", *load,
        f'image = pipe("a photo of a cat", sigmas={info["sigmas"]}, guidance_scale={info["guidance"]:g}).images[0]',
        "```", "",
        "The `sigmas` are the student's window edges in diffusers' unshifted s (the pipeline's stock "
        "`FlowMatchEulerDiscreteScheduler` shifts them and appends 0): one Euler step per window, the "
        "student's own sampler. Without them the scheduler's default grid samples something else."
        + ("" if info.get("use_t5", True) else " The student was distilled without the T5 encoder: load "
           "the pipeline without it, as above."), "",
    ]


def _save_info(out_dir: Path, info: dict, metrics: list[dict] | None) -> None:
    write_export_info(out_dir, info, metrics, usage(info), TAG)


def export_sd3_pipeline(student: nn.Module, teacher: SD3Teacher, out_dir: str | Path, num_windows: int,
                        guidance: float = 1.0, resolution: int | None = None, extra: dict | None = None,
                        dtype: torch.dtype | None = None, metrics: list[dict] | None = None) -> Path:
    """Write the teacher's pipeline with ``student`` as its transformer, ``proreflow.json`` and a model card.

    A LoRA student is merged into plain weights first; dtype: of the saved weights (default: as they
    are); metrics: ``proreflow eval`` rows for the model card.
    """
    out_dir = Path(out_dir)
    transformer = merge_lora(copy.deepcopy(student)) if has_lora(student) else student
    check_finite(transformer.state_dict(), "refusing to export the student transformer")
    pipe = copy.copy(teacher.pipe)  # shares the components, leaves the teacher's pipeline as it was
    pipe.register_modules(transformer=transformer)
    if dtype is not None:
        pipe.register_modules(**{name: copy.deepcopy(module).to(dtype) for name, module in pipe.components.items()
                                 if isinstance(module, nn.Module)})
    pipe.save_pretrained(out_dir, safe_serialization=True)
    info = {**_info(teacher, num_windows, guidance, resolution), "teacher": teacher.source,
            "dtype": str(dtype or transformer.dtype).removeprefix("torch."), **(extra or {})}
    _save_info(out_dir, info, metrics)
    return out_dir


def export_sd3_lora(student: nn.Module, teacher: SD3Teacher, out_dir: str | Path, num_windows: int,
                    guidance: float = 1.0, rank: int = 64, resolution: int | None = None, extra: dict | None = None,
                    dtype: torch.dtype | None = None, metrics: list[dict] | None = None) -> tuple[Path, float]:
    """Save the student as LoRA weights of the teacher's transformer (module doc); the weights file and
    the kept fraction of the weight change (1 for a LoRA student, saved as trained)."""
    out_dir = Path(out_dir)
    adapted, kept = as_lora(student, teacher.transformer, rank)
    path = save_lora(adapted, out_dir, PIPELINE, "transformer", dtype)
    info = {**_info(teacher, num_windows, guidance, resolution), "base": teacher.source, "lora_kept_fraction": kept,
            "dtype": str(dtype or torch.float32).removeprefix("torch."), **(extra or {})}
    _save_info(out_dir, info, metrics)
    return path, kept


def load_sd3_student_pipeline(model: str | Path, lora: str | Path | None = None, num_windows: int | None = None,
                              dtype=None, device=None, local_files_only: bool | None = None):
    """An exported SD3 student (or the base ``model`` with the ``lora`` folder) and its ``proreflow.json``.

    The info always holds ``num_windows`` (the argument, else the export's) and ``window_space``; the T5
    encoder is left out when the student was distilled without it.
    """
    from ..sd.pipeline import apply_lora, open_pipeline, read_model_index

    index = read_model_index(model, local_files_only)
    info = {**read_export_info(model), **(read_export_info(lora) if lora else {})}
    without_t5 = not info.get("use_t5", True) or index.get("text_encoder_3", [None])[0] is None  # saved without
    pipe = open_pipeline(model, dtype, T5_COMPONENTS if without_t5 else (), local_files_only=local_files_only,
                         what="student pipeline", index=index)
    if lora:
        apply_lora(pipe, lora)
    num_windows = num_windows or info.get("num_windows")
    if not num_windows:
        raise ValueError(f"the student's number of windows is unknown: {model} is not an exported student "
                         "and no proreflow.json says it; pass num_windows (--windows)")
    info = {**info, "num_windows": num_windows, "window_space": info.get("window_space", "sigma")}
    if device is not None:
        pipe.to(device)
    return pipe, info


def student_sigmas(pipe, info: dict, steps: int | None = None, resolution: int | None = None) -> list[float]:
    """The sigmas of the student of :func:`load_sd3_student_pipeline` at ``steps`` (default: one per window)
    and ``resolution`` (default: the pipeline's native size; dynamic shifting depends on it)."""
    schedule = SD3Teacher(pipe, "student", info["window_space"]).schedule(resolution)
    return window_sigmas(schedule, TimeWindows(info["num_windows"]), steps)
