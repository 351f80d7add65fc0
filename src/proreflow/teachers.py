"""Denoisers: a network with a declared output type, classifier-free guidance, and a velocity.

A network is any callable ``network(x, timestep, cond) -> output``. ``Denoiser`` gives it the
time convention (t in [0, 1], t = 1 noise; a VP network sees ``tau = max(t * T - 1, 0)``,
:meth:`~proreflow.schedules.VPSchedule.timestep`, a flow-matching network ``sigma(t) * T``,
:mod:`proreflow.flow`), guidance
and the conversion of its output to a velocity (:mod:`proreflow.parametrize`). Teachers and
students are both Denoisers; a student keeps its teacher's prediction type.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .conditioning import Cond, cat_cond, expand_cond
from .flow import FLOW_PREDICTION_TYPE, FlowSchedule
from .parametrize import output_to_velocity
from .schedules import DIFFUSION_PREDICTION_TYPES, PREDICTION_TYPES, VPSchedule, compute_dtype

Network = Callable[[Tensor, Tensor, Any], Tensor]


@dataclass
class Denoiser:
    """``network`` plus what its output means.

    prediction_type: "epsilon", "v_prediction", "sample" (VP diffusion, need ``schedule``) or
        "velocity" (dx/dt in the t convention above) or "flow_velocity" (a flow-matching network's
        dx/dsigma, needs a ``FlowSchedule``).
    time_scale: a flow network sees ``sigma(t) * time_scale`` (default ``T``), a network without a
        schedule ``t * time_scale`` (default 1); a VP network sees ``schedule.timestep(t)``, no scale.
    dtype: dtype of the network's input (e.g. bf16); schedule math stays in float32.
    step_counts: the window counts a step-conditioned student serves (:mod:`proreflow.step_conditioning`);
        its network takes a fourth argument, the window count, and ``count`` (set by :meth:`at_windows`)
        says which: an int, or one per sample. Empty: an unconditioned network ``(x, timestep, cond)``.
    """

    network: Network
    prediction_type: str
    schedule: VPSchedule | FlowSchedule | None = None
    time_scale: float | None = None
    dtype: torch.dtype | None = None
    step_counts: tuple[int, ...] = ()
    count: int | Tensor | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; use one of {PREDICTION_TYPES}")
        if self.prediction_type in DIFFUSION_PREDICTION_TYPES and self.schedule is None:
            raise ValueError(f"a {self.prediction_type!r} denoiser needs a VPSchedule (schedule=...)")
        if (self.prediction_type == FLOW_PREDICTION_TYPE) != isinstance(self.schedule, FlowSchedule):
            raise ValueError(f"a FlowSchedule goes with prediction_type {FLOW_PREDICTION_TYPE!r} and only with it "
                             f"(got {self.prediction_type!r} with {type(self.schedule).__name__})")
        if isinstance(self.schedule, VPSchedule) and self.time_scale is not None:
            raise ValueError("a VP denoiser's network sees schedule.timestep(t); time_scale is for flow-matching "
                             "and schedule-less networks")
        if self.time_scale is None and isinstance(self.schedule, FlowSchedule):
            self.time_scale = float(self.schedule.num_train_timesteps)
        if self.time_scale is None and self.schedule is None:
            self.time_scale = 1.0

    def at_windows(self, count: int | Tensor) -> Denoiser:
        """This denoiser run at window ``count`` (an int, or a ``(B,)`` tensor: one per sample); itself when
        it is not step-conditioned."""
        if not self.step_counts:
            return self
        if isinstance(count, int) and count not in self.step_counts:
            raise ValueError(f"this student serves {'/'.join(map(str, self.step_counts))} windows, not {count}: "
                             "sample it with one of those window counts (steps a multiple of one)")
        return dataclasses.replace(self, count=count)

    def predict(self, x: Tensor, t: Tensor, cond: Cond = None, uncond: Cond = None,
                guidance: float = 1.0) -> Tensor:
        """Network output at ``(x, t)``; with ``guidance != 1`` and an ``uncond``,
        ``out_u + guidance * (out_c - out_u)`` from one batched call."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        if guidance != 1.0 and uncond is not None:
            n = x.shape[0]
            both = self._call(torch.cat([x, x]), torch.cat([t, t]),
                              cat_cond(expand_cond(uncond, n), expand_cond(cond, n)))
            out_u, out_c = both[:n], both[n:]
            return out_u + guidance * (out_c - out_u)
        return self._call(x, t, cond)

    def velocity(self, x: Tensor, t: Tensor, t_target: Tensor, cond: Cond = None,
                 uncond: Cond = None, guidance: float = 1.0) -> Tensor:
        """Velocity of the straight segment from ``(x, t)`` towards time ``t_target``."""
        out = self.predict(x, t, cond, uncond, guidance)
        return output_to_velocity(out, x, t, t_target, self.prediction_type, self.schedule)

    def _call(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dtype = self.dtype or x.dtype
        t = t.to(compute_dtype(x))
        if isinstance(self.schedule, VPSchedule):
            timestep = self.schedule.timestep(t)
        else:
            timestep = (self.schedule.sigma(t) if isinstance(self.schedule, FlowSchedule) else t) * self.time_scale
        if self.step_counts:
            if self.count is None:
                raise ValueError("a step-conditioned student runs at a window count: use denoiser.at_windows(k) "
                                 "(proreflow.sampling.sample does this with the windows it samples)")
            out = self.network(x.to(dtype), timestep, cond, self.count)
        else:
            out = self.network(x.to(dtype), timestep, cond)
        if out.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for input {tuple(x.shape)}: "
                             "a denoiser's output must have its input's shape")
        return out


def diffusers_network(model) -> Network:
    """Adapt a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (or similar) to ``(x, timestep, cond)``.

    ``cond`` may be a dict of keyword arguments (``encoder_hidden_states``, ``added_cond_kwargs``,
    ``class_labels``), or a tensor: the text states of a conditional UNet, else class labels.
    """
    params = inspect.signature(model.forward).parameters
    tensor_key = "encoder_hidden_states" if "encoder_hidden_states" in params else "class_labels"

    def network(x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        kwargs = cond if isinstance(cond, dict) else ({} if cond is None else {tensor_key: cond})
        return model(x, timestep, **kwargs, return_dict=False)[0]

    return network

