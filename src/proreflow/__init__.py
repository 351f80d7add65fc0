"""proreflow: distill diffusion models into few-step piecewise-straight flows (ProReflow).

Time convention: t in [0, 1], t = 1 is noise, t = 0 is data.
"""

from .conditioning import cat_cond, select_cond
from .flow import FlowSchedule
from .losses import LossTerms, aligned_v_loss
from .parametrize import ddim_step, output_to_velocity, velocity_to_output
from .sampling import sample
from .schedules import VPSchedule, convert_output, from_x0_eps, to_x0_eps
from .solvers import solve
from .targets import (
    ReflowBatch,
    StageTeacher,
    at_window_start,
    make_reflow_batch,
    make_trajectory_batch,
    sample_times,
    teacher_trajectory,
)
from .teachers import Denoiser, diffusers_network
from .windows import TimeWindows

__version__ = "0.1.0"

__all__ = [
    "Denoiser", "FlowSchedule", "LossTerms", "ReflowBatch", "StageTeacher", "TimeWindows", "VPSchedule",
    "aligned_v_loss", "at_window_start", "cat_cond", "convert_output", "ddim_step", "diffusers_network", "from_x0_eps",
    "make_reflow_batch", "make_trajectory_batch", "output_to_velocity", "sample", "sample_times", "select_cond",
    "solve", "teacher_trajectory", "to_x0_eps", "velocity_to_output",
]
