"""proreflow's VP timestep convention against the one it replaced, both against diffusers' trailing DDIM.

proreflow maps t in [0, 1] to the timestep ``tau = max(t * T - 1, 0)`` with ``alphas_cumprod``
interpolated (:mod:`proreflow.schedules`): diffusers' trailing grid, so one step per window lands on
the integer timesteps diffusers' trailing DDIM (and PeRFlow) use. Until 2026-12-01 it used
``tau = t * (T - 1)`` (749.25 against 749 at 4 steps). All three are DDIM from ``abar[T-1]`` to
``abar[0]`` (``set_alpha_to_one=False``). This script measures, on SD's scaled-linear schedule (T = 1000):

- an exact teacher: data N(mu, s^2 I), whose eps-prediction (a function of the timestep) and ODE flow
  are closed forms: each sampler's gap to diffusers' trailing DDIM and its error against the exact
  ODE solution (float64);
- a tiny random diffusers UNet2DConditionModel (fixed noise and text states): the gaps in latents
  (float32, as pipelines run).

    python benchmarks/timestep_convention.py            # writes docs/timestep-convention.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: E402

from proreflow import Denoiser, TimeWindows, VPSchedule, sample  # noqa: E402
from proreflow.sd.scheduler import TRAILING_DDIM  # noqa: E402
from proreflow.teachers import diffusers_network  # noqa: E402

STEPS = (1, 2, 4, 8, 32)


def ddim_trailing(network, noise: torch.Tensor, steps: int, cond=None) -> torch.Tensor:
    """diffusers' DDIMScheduler with :data:`TRAILING_DDIM`, the network called on its integer timesteps."""
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **TRAILING_DDIM)
    scheduler.alphas_cumprod = VPSchedule.from_betas().alphas_cumprod  # float64 table: no float32 rounding
    scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]
    scheduler.set_timesteps(steps)
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(network(x, t.to(torch.float64), cond), t, x).prev_sample
    return x


@dataclass(frozen=True)
class FormerSchedule(VPSchedule):
    """The convention before 2026-12-01: ``tau = t * (T - 1)`` (``abar`` follows: it reads :meth:`timestep`)."""

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(t) * (self.num_train_timesteps - 1)


def abar_at(table: torch.Tensor, timestep) -> torch.Tensor:
    """``alphas_cumprod`` at a (fractional) timestep, linear between integers: what a VP network has learned."""
    tau = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)[:1].clamp(0, table.numel() - 1)
    lo = tau.floor().long().clamp(max=table.numel() - 2)
    return table[lo] + (tau - lo) * (table[lo + 1] - table[lo])


def gaussian(table: torch.Tensor, mu: float, s: float):
    """eps-prediction ``sqrt(1-a) (x - sqrt(a) mu) / (a s^2 + 1 - a)`` of N(mu, s^2) at ``a = abar(timestep)``,
    and its exact ODE flow from ``abar[T-1]`` to ``abar[0]``."""

    def network(x, timestep, cond):
        a = abar_at(table, timestep)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    def flow(x):  # from t = 1 to t = 0: the standardized position is conserved
        a1, a0 = table[-1], table[0]
        sig1, sig0 = (a1 * s**2 + 1 - a1).sqrt(), (a0 * s**2 + 1 - a0).sqrt()
        return a0.sqrt() * mu + sig0 * (x - a1.sqrt() * mu) / sig1

    return network, flow


def rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


def gaussian_rows(mu: float = 0.5, s: float = 0.5, n: int = 4096) -> list[str]:
    current = VPSchedule.from_betas()
    former = FormerSchedule(current.alphas_cumprod)
    network, flow = gaussian(current.alphas_cumprod, mu, s)
    noise = torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = flow(noise)
    rows = []
    for steps in STEPS:
        now, then = (sample(Denoiser(network, "epsilon", schedule), noise, TimeWindows(steps), steps)
                     for schedule in (current, former))
        ddim = ddim_trailing(network, noise, steps)
        rows.append(f"| {steps} | {(now - ddim).abs().max().item():.2e} | {(then - ddim).abs().max().item():.2e} | "
                    f"{rms(now - exact):.3e} | {rms(then - exact):.3e} | {rms(ddim - exact):.3e} |")
    return rows


def tiny_unet_rows() -> list[str]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()
    network = diffusers_network(unet)
    cond = {"encoder_hidden_states": torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))}
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    current = VPSchedule.from_betas()
    rows = []
    with torch.no_grad():
        for steps in STEPS[:4]:
            now, then = (sample(Denoiser(network, "epsilon", schedule), noise, TimeWindows(steps), steps, cond)
                         for schedule in (current, FormerSchedule(current.alphas_cumprod)))
            ddim = ddim_trailing(lambda x, t, c: network(x, t.float(), c), noise, steps, cond)
            rows.append(f"| {steps} | {(now - ddim).abs().max().item():.2e} | {(then - ddim).abs().max().item():.2e} "
                        f"| {ddim.abs().max().item():.1f} |")
    return rows


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's machine type."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/timestep-convention.md")
    args = p.parse_args()
    lines = ["# Timestep convention: diffusers' trailing `tau = t * T - 1` (since 2026-12-01) vs `t * (T - 1)`", "",
             f"Written by `python benchmarks/timestep_convention.py` on {cpu_name()}, "
             f"{time.strftime('%Y-%m-%d')} (CPU, float64 where stated). Every sampler is DDIM from `abar[999]` to "
             "`abar[0]` on SD's scaled-linear schedule, one step per window; they differ only in the intermediate "
             "timesteps. *now*: `proreflow.sample` today; *former*: `proreflow.sample` with `tau = t * (T - 1)`; "
             "*DDIM*: diffusers' `DDIMScheduler` with `timestep_spacing='trailing', set_alpha_to_one=False` (what "
             "exports carry and what `proreflow eval` takes as the teacher). Student quality under both conventions "
             "and the decision: `docs/research/2026-quality-study.md`, *Timestep convention (issue 14)*.", "",
             "## Exact teacher: data N(0.5, 0.25 I), 4096 x 4 samples, float64", "",
             "| steps | max gap now vs DDIM | max gap former vs DDIM | RMS error vs exact ODE: now | former | DDIM |",
             "|---|---|---|---|---|---|", *gaussian_rows(), "",
             "32 steps do not divide T = 1000: diffusers rounds the trailing timesteps to integers, proreflow steps "
             "on `k / 32` exactly; for such step counts only `ProReflowScheduler` reproduces proreflow's sampler.", "",
             "## Tiny random SD-style UNet (float32, fixed noise and text states)", "",
             "| steps | max gap in latents, now vs DDIM | former vs DDIM | max latent |", "|---|---|---|---|",
             *tiny_unet_rows(), ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
