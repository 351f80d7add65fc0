"""proreflow: distill diffusion models into few-step piecewise-straight flows (ProReflow).

Time convention: t in [0, 1], t = 1 is noise, t = 0 is data.
"""

import importlib

_EXPORTS = {
    "cat_cond": "conditioning", "select_cond": "conditioning", "FlowSchedule": "flow", "LossTerms": "losses",
    "aligned_v_loss": "losses", "ddim_step": "parametrize", "output_to_velocity": "parametrize",
    "velocity_to_output": "parametrize", "sample": "sampling", "VPSchedule": "schedules",
    "convert_output": "schedules", "from_x0_eps": "schedules", "to_x0_eps": "schedules", "solve": "solvers",
    "ReflowBatch": "targets", "StageTeacher": "targets", "at_window_start": "targets",
    "make_reflow_batch": "targets", "make_trajectory_batch": "targets", "sample_times": "targets",
    "teacher_trajectory": "targets", "Denoiser": "teachers", "diffusers_network": "teachers",
    "TimeWindows": "windows",
}
"""Public name -> the module that defines it. They are imported on first use (PEP 562), so ``import proreflow``
(and the command line, before it installs its signal handlers) does not load torch."""


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'proreflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__version__ = "0.1.0"

__all__ = [
    "Denoiser", "FlowSchedule", "LossTerms", "ReflowBatch", "StageTeacher", "TimeWindows", "VPSchedule",
    "aligned_v_loss", "at_window_start", "cat_cond", "convert_output", "ddim_step", "diffusers_network", "from_x0_eps",
    "make_reflow_batch", "make_trajectory_batch", "output_to_velocity", "sample", "sample_times", "select_cond",
    "solve", "teacher_trajectory", "to_x0_eps", "velocity_to_output",
]
