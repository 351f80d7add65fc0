"""``ProReflowScheduler``: sample a ProReflow student inside diffusers pipelines.

``set_timesteps(n)`` lays the sampler grid ``TimeWindows(num_windows).for_steps(n).time_grid(n)``:
one ``(t, t_next, t_window_end)`` per step, t = 1 noise -> t = 0 data, ``n >= num_windows`` steps
spread evenly over the windows, fewer steps each spanning whole windows
(:meth:`~proreflow.windows.TimeWindows.for_steps`). The pipeline feeds the UNet ``timesteps = max(t * T - 1, 0)``
(the VP timestep convention of :mod:`proreflow.schedules`, the same value a
:class:`proreflow.Denoiser` passes). ``step`` turns the UNet output into the velocity of the
straight segment towards the window's end with :func:`proreflow.parametrize.output_to_velocity`
and takes the Euler step ``x <- x + (t_next - t) * v``: the math of :func:`proreflow.sampling.sample`.
Inputs need no scaling (``init_noise_sigma = 1``, ``scale_model_input`` is the identity).

Defaults are diffusers' own (``DDPMScheduler``: linear betas 0.0001 .. 0.02): ``from_config``
drops the keys a source config left at their defaults, so equal defaults keep the teacher's
schedule. ``betas``, ``alphas`` and ``alphas_cumprod`` are float32 tensors, as in diffusers.

Stock alternative (:func:`trailing_ddim`, :data:`TRAILING_DDIM_LINE`): diffusers' own
``DDIMScheduler`` with trailing spacing, ``set_alpha_to_one=False`` and no clipping, at
``num_inference_steps == num_windows``, takes the student's steps from window edge to window
edge: the same timesteps (``k * T / W - 1``, integers when ``W`` divides ``T``) and the same
``abar``, so the same sampler up to float rounding. It is what exports carry, so that they load
without proreflow. For a ``W`` that does not divide ``T`` (3 windows: edge timesteps 665.67 and
332.33 here, 666 and 332 there) or more steps than windows, it is not exact: use this scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from torch import Tensor

from ..parametrize import output_to_velocity
from ..schedules import DIFFUSION_PREDICTION_TYPES, VPSchedule, compute_dtype
from ..windows import TimeWindows

TRAILING_DDIM = {"timestep_spacing": "trailing", "set_alpha_to_one": False, "clip_sample": False}
"""DDIMScheduler settings of the student's sampler (module doc): the last step lands on
``alphas_cumprod[0]`` as :func:`proreflow.sample` does (``set_alpha_to_one=True`` would land on 1)."""

TRAILING_DDIM_LINE = ("pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, "
                      + ", ".join(f"{k}={v!r}" for k, v in TRAILING_DDIM.items()) + ")")
"""The one line that gives a pipeline the student's sampler with stock diffusers (needs
``from diffusers import DDIMScheduler``); sample with ``num_inference_steps`` = the student's windows."""

PROREFLOW_LINE = "pipe.scheduler = ProReflowScheduler.from_config(pipe.scheduler.config, num_windows={windows})"
"""The opt-in line (``from proreflow.sd import ProReflowScheduler``): our exact sampler, any
number of steps. Format with ``windows=``."""


def explicit_config(config) -> dict:
    """A scheduler config with the values its scheduler took from its own defaults kept as values.

    ``from_config`` drops the keys listed in ``_use_default_values`` and uses the new class's
    defaults: an LCMScheduler's 0.00085 .. 0.012 would become DDIM's 0.0001 .. 0.02. Without the
    list every value carries over, the schedule training reads (``VPSchedule.from_scheduler_config``).
    """
    return {k: v for k, v in dict(config).items() if k != "_use_default_values"}


def trailing_ddim(config):
    """The stock scheduler of :data:`TRAILING_DDIM_LINE` on exactly the schedule of ``config``
    (:func:`explicit_config`)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(explicit_config(config), **TRAILING_DDIM)


@dataclass
class ProReflowSchedulerOutput(BaseOutput):
    """``prev_sample``: the state after the step (at ``t_next``)."""

    prev_sample: Tensor


class ProReflowScheduler(SchedulerMixin, ConfigMixin):
    """Piecewise-straight Euler sampling of a ProReflow student (module doc).

    The config holds the teacher's VP schedule (``num_train_timesteps``, ``beta_*``,
    ``trained_betas``, ``rescale_betas_zero_snr``), the student's output type
    (``prediction_type``, the teacher's) and the windows of its last training stage
    (``num_windows``). ``ProReflowScheduler.from_config(pipe.scheduler.config, num_windows=4)``
    turns a teacher pipeline's scheduler config into one.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "epsilon", rescale_betas_zero_snr: bool = False, num_windows: int = 4):
        if prediction_type not in DIFFUSION_PREDICTION_TYPES:
            raise ValueError(f"ProReflowScheduler samples VP students; prediction_type must be one of "
                             f"{DIFFUSION_PREDICTION_TYPES}, got {prediction_type!r}")
        self.schedule = VPSchedule.from_scheduler_config(self.config)
        abar = self.schedule.alphas_cumprod  # float64; alphas[i] = abar[i] / abar[i - 1]
        self.alphas_cumprod = abar.to(torch.float32)
        self.alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]]).to(torch.float32)
        self.betas = 1.0 - self.alphas
        self.windows = TimeWindows(num_windows)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps: Tensor | None = None
        self._grid: Tensor | None = None  # (n, 3) float64 rows (t, t_next, t_window_end)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Lay the grid for ``num_inference_steps`` steps (module doc)."""
        grid = self.windows.for_steps(num_inference_steps).time_grid(num_inference_steps)
        self._grid = torch.tensor(grid, dtype=torch.float64)
        self.num_inference_steps = num_inference_steps
        self.timesteps = self.schedule.timestep(self._grid[:, 0].to(torch.float32)).to(device)

    def scale_model_input(self, sample: Tensor, timestep: float | Tensor | None = None) -> Tensor:
        """Identity: the student sees ``x_t`` as is."""
        return sample

    def index_for_timestep(self, timestep: float | Tensor) -> int:
        """Row of the grid whose timestep is ``timestep`` (the grid's timesteps are distinct)."""
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        value = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)[0].item()
        gaps = (self.timesteps.detach().cpu() - value).abs()
        index = int(gaps.argmin())
        if gaps[index] > 1e-3:
            raise ValueError(f"timestep {value} is not on the grid set by set_timesteps "
                             f"({self.timesteps.tolist()})")
        return index

    def step(self, model_output: Tensor, timestep: float | Tensor, sample: Tensor,
             return_dict: bool = True) -> ProReflowSchedulerOutput | tuple[Tensor]:
        """One Euler step ``x + (t_next - t) * v`` with ``v = output_to_velocity(...)`` (module doc).

        Schedule math runs in float32 (float64 for float64 samples); the result has ``sample``'s dtype.
        """
        dtype = compute_dtype(sample)
        t, t_next, t_end = self._grid[self.index_for_timestep(timestep)].to(device=sample.device, dtype=dtype)
        v = output_to_velocity(model_output, sample, t, t_end, self.config.prediction_type, self.schedule)
        prev = (sample.to(dtype) + (t_next - t) * v).to(sample.dtype)
        return ProReflowSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """Forward noising ``sqrt(abar) x0 + sqrt(1 - abar) eps`` at ``t = (timesteps + 1) / T`` (img2img)."""
        t = self.schedule.time(torch.as_tensor(timesteps, device=original_samples.device).float())
        t = t.reshape(-1).expand(original_samples.shape[0])
        return self.schedule.add_noise(original_samples, noise, t).to(original_samples.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
