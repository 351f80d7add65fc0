"""Export a trained Stable Diffusion student: a complete diffusers pipeline folder, or LoRA weights.

Pipeline export (:func:`export_pipeline`): the teacher's pipeline (VAE, tokenizers, text
encoders, its class: StableDiffusion / StableDiffusionXL) with the student's UNet and a
:class:`ProReflowScheduler` (the student's windows), saved with ``save_pretrained``; it loads
with ``DiffusionPipeline.from_pretrained(DIR)`` where proreflow is installed.

LoRA export (:func:`export_lora`): ``pytorch_lora_weights.safetensors`` for
``pipe.load_lora_weights(DIR)`` on the base pipeline or a fine-tune of it, used with
``ProReflowScheduler.from_config(pipe.scheduler.config, num_windows=...)``.

Both write ``proreflow.json``: the windows, the guidance scale to sample with (1 when guidance
was baked in), the output type and where the student came from.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from torch import nn

from ..training.checkpoint import check_finite
from .lora import add_lora, extract_lora, has_lora, merge_lora, save_lora
from .scheduler import ProReflowScheduler

EXPORT_INFO = "proreflow.json"


def read_export_info(folder: str | Path) -> dict[str, Any]:
    """``proreflow.json`` of an exported pipeline or LoRA folder ({} if absent)."""
    path = Path(folder) / EXPORT_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_info(out_dir: Path, num_windows: int, guidance: float, prediction_type: str, extra: dict) -> None:
    info = {"num_windows": num_windows, "guidance": guidance, "prediction_type": prediction_type, **extra}
    (out_dir / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")


def load_run_student(run_dir: str | Path, teacher_unet: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """The final (EMA) student UNet of a ``stable-diffusion`` training run, and its ``student.json``.

    Rebuilt as the run built it: a copy of the teacher's UNet (with LoRA layers when the run
    trained LoRA), then the saved weights.
    """
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    info_path, weights = run_dir / "student.json", run_dir / "student.safetensors"
    if not info_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{run_dir} holds no trained student (student.json / student.safetensors); "
                                "give the output folder of a finished `proreflow train` stage")
    info = json.loads(info_path.read_text())
    setup_info = info.get("info", {})
    if setup_info.get("model") != "stable-diffusion":
        raise ValueError(f"{run_dir} is a {setup_info.get('model', 'non Stable Diffusion')!r} run; export "
                         "takes runs of the stable-diffusion setup")
    unet = copy.deepcopy(teacher_unet)
    if setup_info.get("lora_rank"):
        add_lora(unet, setup_info["lora_rank"], setup_info.get("lora_alpha"))
    unet.load_state_dict(load_file(str(weights)))
    return unet.eval().requires_grad_(False), info


def export_pipeline(student_unet: nn.Module, teacher, out_dir: str | Path, num_windows: int,
                    guidance: float = 1.0, extra: dict | None = None) -> Path:
    """Save the teacher's pipeline with ``student_unet`` and a ProReflowScheduler (module doc).

    teacher: an :class:`~proreflow.models.stable_diffusion.SDTeacher` (its pipeline's other
    components are saved). A LoRA student is merged into plain UNet weights first.
    """
    out_dir = Path(out_dir)
    unet = merge_lora(copy.deepcopy(student_unet)) if has_lora(student_unet) else student_unet
    check_finite(unet.state_dict(), "refusing to export the student UNet")
    pipe = copy.copy(teacher.pipe)  # shares the components, leaves the teacher's pipeline as it was
    scheduler = ProReflowScheduler.from_config(pipe.scheduler.config, num_windows=num_windows)
    pipe.register_modules(unet=unet, scheduler=scheduler)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _write_info(out_dir, num_windows, guidance, scheduler.config.prediction_type,
                {"teacher": teacher.source, **(extra or {})})
    return out_dir


def export_lora(student_unet: nn.Module, teacher, out_dir: str | Path, num_windows: int, guidance: float = 1.0,
                rank: int = 64, extra: dict | None = None) -> tuple[Path, float]:
    """Save the student as LoRA weights for the teacher's pipeline (module doc).

    A LoRA student is saved as trained (kept fraction 1); a fully fine-tuned one is extracted
    at ``rank`` by SVD (:func:`~proreflow.diffusers.lora.extract_lora`). Returns the weights
    file and the kept fraction of the weight change.
    """
    out_dir = Path(out_dir)
    kept = 1.0
    if has_lora(student_unet):
        adapted = student_unet
    else:
        adapted, kept = extract_lora(student_unet, teacher.unet, rank)
    check_finite(adapted.state_dict(), "refusing to export the student's LoRA weights")
    path = save_lora(adapted, out_dir, teacher.is_sdxl)
    _write_info(out_dir, num_windows, guidance, teacher.prediction_type,
                {"base": teacher.source, "lora_kept_fraction": kept, **(extra or {})})
    return path, kept


def load_student_pipeline(model: str | Path, lora: str | Path | None = None, num_windows: int | None = None,
                          dtype=None, device=None, local_files_only: bool | None = None):
    """A diffusers pipeline that samples a student with :class:`ProReflowScheduler`.

    model: an exported pipeline folder, or (with ``lora``) the base pipeline the LoRA belongs to.
    num_windows: default from ``proreflow.json`` (of the LoRA folder, then of the model) or the
    pipeline's ProReflowScheduler config.
    """
    from diffusers import DiffusionPipeline

    from ..models.stable_diffusion import UNUSED_COMPONENTS, default_local_files_only, read_model_index

    local_files_only = default_local_files_only() if local_files_only is None else local_files_only
    index = read_model_index(model, local_files_only)
    unused = {name: None for name in UNUSED_COMPONENTS if name in index}
    pipe = DiffusionPipeline.from_pretrained(str(model), torch_dtype=dtype, local_files_only=local_files_only, **unused)
    info = {**read_export_info(model), **(read_export_info(lora) if lora else {})}
    if lora:
        pipe.load_lora_weights(str(lora))
    num_windows = num_windows or info.get("num_windows") or pipe.scheduler.config.get("num_windows")
    if not num_windows:
        raise ValueError(f"the student's number of windows is unknown: {model} is not an exported student "
                         "and no proreflow.json says it; pass num_windows (--windows)")
    pipe.scheduler = ProReflowScheduler.from_config(pipe.scheduler.config, num_windows=num_windows)
    if device is not None:
        pipe.to(device)
    return pipe, info
