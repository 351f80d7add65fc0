"""Export an SD3 student as a stock ``StableDiffusion3Pipeline`` folder.

The folder is the teacher's pipeline with the student's transformer and the teacher's own
``FlowMatchEulerDiscreteScheduler`` (its config unchanged), plus ``proreflow.json`` holding the
custom ``sigmas`` to sample with: diffusers' unshifted ``s`` at the window edges
``e_0 .. e_{k-1}`` (it shifts them and appends sigma = 0 itself). One diffusers Euler step from
``sigma(e_i)`` to ``sigma(e_{i+1})`` is exactly one step of the student in ``t`` towards its window
end (:mod:`proreflow.flow`), so

    StableDiffusion3Pipeline.from_pretrained(DIR)(prompt, sigmas=info["sigmas"], guidance_scale=g)

reproduces ``proreflow.sample(student, noise, TimeWindows(k), k)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..flow import FlowSchedule
from ..sd.export import EXPORT_INFO, read_export_info
from ..windows import TimeWindows
from .pipeline import SD3Teacher

__all__ = ["export_sd3_pipeline", "read_export_info", "window_sigmas"]


def window_sigmas(schedule: FlowSchedule, windows: TimeWindows) -> list[float]:
    """``set_timesteps(sigmas=...)`` of a piecewise-straight student: unshifted s at edges ``e_0 .. e_{k-1}``."""
    return schedule.unshifted(windows.edges()[:-1]).tolist()


def export_sd3_pipeline(student: nn.Module, teacher: SD3Teacher, out_dir: str | Path, num_windows: int,
                        guidance: float = 1.0, resolution: int | None = None) -> Path:
    """Write the teacher's pipeline with ``student`` as its transformer, and ``proreflow.json``."""
    out_dir = Path(out_dir)
    pipe = teacher.pipe
    original = pipe.transformer
    pipe.transformer = student
    try:
        pipe.save_pretrained(out_dir)
    finally:
        pipe.transformer = original
    schedule = teacher.schedule(resolution)
    info = {"num_windows": num_windows, "guidance": guidance, "prediction_type": "flow_velocity",
            "window_space": schedule.window_space, "shift": schedule.shift,
            "mu": teacher.mu(resolution or teacher.resolution),
            "sigmas": window_sigmas(schedule, TimeWindows(num_windows)), "num_inference_steps": num_windows}
    (out_dir / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir
