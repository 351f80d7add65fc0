"""Our VP timestep convention against diffusers' trailing integer grid, measured (no decision made here).

proreflow maps t in [0, 1] to the timestep ``tau = t * (T - 1)`` with ``alphas_cumprod`` interpolated
(:mod:`proreflow.schedules`); diffusers' trailing DDIM (and PeRFlow) step on the integer timesteps
``round(t * T) - 1`` with the table's ``alphas_cumprod``. Both are DDIM from ``abar[T-1]`` to
``abar[0]`` (``set_alpha_to_one=False``); they differ only in the intermediate timesteps (749.25 vs
749 at 4 steps). This script measures, on SD's scaled-linear schedule (T = 1000):

- an exact teacher: data N(mu, s^2 I), whose eps-prediction and ODE flow are closed forms: the gap
  between the two samplers and each one's error against the exact ODE solution (float64);
- a tiny random diffusers UNet2DConditionModel (fixed noise and text states): the gap in latents.

    python benchmarks/timestep_convention.py            # writes docs/timestep-convention.md
"""

from __future__ import annotations

import argparse
import sys
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


def gaussian(schedule: VPSchedule, mu: float, s: float):
    """eps-prediction ``sqrt(1-a) (x - sqrt(a) mu) / (a s^2 + 1 - a)`` of N(mu, s^2) and its exact ODE flow."""

    def network(x, timestep, cond):
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)[:1] / (schedule.num_train_timesteps - 1)
        a = schedule.abar(t)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    def flow(x):  # from t = 1 to t = 0: the standardized position is conserved
        a1, a0 = schedule.alphas_cumprod[-1], schedule.alphas_cumprod[0]
        sig1, sig0 = (a1 * s**2 + 1 - a1).sqrt(), (a0 * s**2 + 1 - a0).sqrt()
        return a0.sqrt() * mu + sig0 * (x - a1.sqrt() * mu) / sig1

    return network, flow


def rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


def gaussian_rows(mu: float = 0.5, s: float = 0.5, n: int = 4096) -> list[str]:
    schedule = VPSchedule.from_betas()
    network, flow = gaussian(schedule, mu, s)
    noise = torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = flow(noise)
    ours_teacher = Denoiser(network, "epsilon", schedule)
    rows = []
    for steps in STEPS:
        ours = sample(ours_teacher, noise, TimeWindows(steps), steps)
        theirs = ddim_trailing(network, noise, steps)
        rows.append(f"| {steps} | {(ours - theirs).abs().max().item():.2e} | {rms(ours - theirs):.2e} | "
                    f"{rms(ours - exact):.2e} | {rms(theirs - exact):.2e} |")
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
    teacher = Denoiser(network, "epsilon", VPSchedule.from_betas())
    rows = []
    with torch.no_grad():
        for steps in STEPS[:4]:
            ours = sample(teacher, noise, TimeWindows(steps), steps, cond)
            theirs = ddim_trailing(lambda x, t, c: network(x, t.float(), c), noise, steps, cond)
            rows.append(f"| {steps} | {(ours - theirs).abs().max().item():.2e} | {ours.abs().max().item():.1f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/timestep-convention.md")
    args = p.parse_args()
    lines = ["# Timestep convention: `t * (T - 1)` interpolated (ours) vs diffusers' trailing `t * T - 1`", "",
             "Written by `python benchmarks/timestep_convention.py` (CPU, float64 where stated). Both samplers are",
             "DDIM from `abar[999]` to `abar[0]` on SD's scaled-linear schedule; only the intermediate timesteps",
             "differ. Nothing here changes the convention: it is the measurement to decide by.", "",
             "## Exact teacher: data N(0.5, 0.25 I), 4096 x 4 samples, float64", "",
             "| steps | max gap | RMS gap | RMS error, ours vs exact ODE | RMS error, trailing DDIM vs exact ODE |",
             "|---|---|---|---|---|", *gaussian_rows(), "",
             "## Tiny random SD-style UNet (float32, fixed noise and text states)", "",
             "| steps | max gap in latents | max latent |", "|---|---|---|", *tiny_unet_rows(), ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
