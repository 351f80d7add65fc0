"""Teacher window solvers: endpoint error against a fine reference versus teacher evaluations.

For each teacher and each split into 8, 4 and 2 windows, every window is solved from forward-noised
start points ``x_start`` (data noised to the window start, as a training batch does) by each solver
(:data:`proreflow.solvers.SOLVERS`) at several step counts. The error is the RMS of
``x_end - x_ref`` over samples and elements, averaged over the windows; ``x_ref`` is the exact flow
for the Gaussian teacher and a Heun solve with 128 steps (256 evaluations) per window otherwise.
Evaluations are counted at the network (a guided evaluation is two: conditional and
unconditional halves of one batch) and given per window and per sample.

Teachers: (a) the closed-form Gaussian teacher N(0.7, 0.3^2) (float64, exact reference), (b) the
built-in MNIST teacher (cached under ~/.cache/proreflow/teachers; guided at its default scale
2.0), (c) a random-weight SD-architecture UNet2DConditionModel at small width on CPU (unguided,
random text states). Writes ``docs/solvers.md``.

    python3 benchmarks/solvers.py [--batch 16] [--out docs/solvers.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

from proreflow import Denoiser, TimeWindows, VPSchedule, solve
from proreflow.solvers import SOLVERS

STEPS = {"ddim": (2, 4, 8, 16), "dpmpp_2m": (1, 2, 3, 4, 8), "heun": (1, 2, 3, 4)}
REFERENCE = ("heun", 128)
WINDOWS = (8, 4, 2)


class Counter:
    """A network that counts evaluations per sample (a guided call of batch 2B counts 2B)."""

    def __init__(self, network):
        self.network, self.count = network, 0

    def __call__(self, x, timestep, cond):
        self.count += x.shape[0]
        return self.network(x, timestep, cond)


def gaussian_teacher(batch: int):
    schedule = VPSchedule.from_betas()
    mu, s = 0.7, 0.3

    def network(x, timestep, cond):
        a = schedule.abar(schedule.time(timestep.to(torch.float64))).reshape(-1, 1)  # the network's own t
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    def exact(x, t_from, t_to):
        a_f, a_t = schedule.abar(t_from).reshape(-1, 1), schedule.abar(t_to).reshape(-1, 1)
        sig_f, sig_t = (a_f * s**2 + 1 - a_f).sqrt(), (a_t * s**2 + 1 - a_t).sqrt()
        return a_t.sqrt() * mu + sig_t * (x - a_f.sqrt() * mu) / sig_f

    g = torch.Generator().manual_seed(0)
    x0 = mu + s * torch.randn(batch, 8, generator=g, dtype=torch.float64)
    return "Gaussian N(0.7, 0.3^2), closed form, float64", network, schedule, x0, None, None, 1.0, exact


def mnist_teacher(batch: int):
    from proreflow.builtin.teacher import builtin_setup

    setup = builtin_setup("mnist", progress=False)
    items = [setup.dataset[i] for i in range(batch)]
    x0 = torch.stack([x for x, _ in items])
    cond = torch.stack([c for _, c in items])
    network = setup.adapter(setup.teacher_model.eval())
    return ("built-in MNIST teacher (cached), guidance 2.0", network, setup.schedule, x0, cond,
            setup.uncond, 2.0, None)


def sd_unet(batch: int):
    from diffusers import UNet2DConditionModel

    from proreflow import diffusers_network

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 4, 16, 16, generator=g)
    cond = torch.randn(batch, 7, 32, generator=g)
    return ("random-weight SD-architecture UNet (2 blocks, width 32/64, 16x16x4 latents), unguided",
            diffusers_network(unet), VPSchedule.from_betas(), x0, cond, None, 1.0, None)


@torch.no_grad()
def measure(make, batch: int) -> tuple[str, list[dict]]:
    name, network, schedule, x0, cond, uncond, guidance, exact = make(batch)
    counter = Counter(network)
    teacher = Denoiser(counter, "epsilon", schedule)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    rows = []
    for k in WINDOWS:
        windows = TimeWindows(k)
        starts = [windows.bounds(torch.full((batch,), 1.0 - (i + 0.5) / k, dtype=torch.float64))
                  for i in range(k)]
        refs, x_starts = [], []
        for t_start, t_end in starts:
            t_start, t_end = t_start.to(x0.dtype), t_end.to(x0.dtype)
            x = schedule.add_noise(x0, noise, t_start)
            x_starts.append(x)
            refs.append(exact(x, t_start, t_end) if exact is not None else
                        solve(teacher, x, t_start, t_end, REFERENCE[1], cond, uncond, guidance, solver=REFERENCE[0]))
        for solver in SOLVERS:
            for steps in STEPS[solver]:
                counter.count, errors, start = 0, [], time.perf_counter()
                for (t_start, t_end), x, ref in zip(starts, x_starts, refs):
                    out = solve(teacher, x, t_start.to(x0.dtype), t_end.to(x0.dtype), steps, cond, uncond,
                                guidance, solver=solver)
                    errors.append((out - ref).pow(2).mean().sqrt().item())
                rows.append({"windows": k, "solver": solver, "steps": steps,
                             "evals": counter.count / (k * batch), "error": sum(errors) / k,
                             "seconds": time.perf_counter() - start})
    return name, rows


def verdict(rows: list[dict]) -> list[str]:
    """Per window count: the cheapest solver setting whose error is at most DDIM-8's."""
    lines = []
    for k in WINDOWS:
        here = [r for r in rows if r["windows"] == k]
        ddim8 = next(r for r in here if r["solver"] == "ddim" and r["steps"] == 8)
        ok = sorted((r for r in here if r["error"] <= ddim8["error"] and r["evals"] <= ddim8["evals"] / 2),
                    key=lambda r: (r["evals"], r["error"]))
        if ok:
            best = ok[0]
            lines.append(f"- {k} windows: **{best['solver']} {best['steps']} steps** ({best['evals']:g} evaluations "
                         f"per window per sample, error {best['error']:.3g}) matches DDIM-8 ({ddim8['evals']:g} "
                         f"evaluations, error {ddim8['error']:.3g}) with at most half its evaluations")
        else:
            lines.append(f"- {k} windows: no solver matches DDIM-8 (error {ddim8['error']:.3g}) with at most "
                         f"half its evaluations")
    return lines


def table(rows: list[dict]) -> list[str]:
    out = ["| windows | solver | steps / window | evaluations / window / sample | endpoint RMS error |",
           "|---:|---|---:|---:|---:|"]
    out += [f"| {r['windows']} | {r['solver']} | {r['steps']} | {r['evals']:g} | {r['error']:.3e} |" for r in rows]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="samples per window")
    parser.add_argument("--out", default="docs/solvers.md")
    parser.add_argument("--only", choices=("gaussian", "mnist", "sd"), action="append",
                        help="run only these teachers (repeatable)")
    args = parser.parse_args(argv)
    makers = {"gaussian": gaussian_teacher, "mnist": mnist_teacher, "sd": sd_unet}
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    doc = ["# Teacher window solvers: endpoint error versus evaluations", "",
           f"{when}, {machine}, torch {torch.__version__}. Command: `python3 benchmarks/{Path(__file__).name} "
           f"{' '.join(sys.argv[1:] if argv is None else argv)}`".rstrip() + "", "",
           __doc__.split("\n\n")[1].replace("\n", " "), "",
           "Guided solves count 2 network evaluations per guided evaluation (MNIST rows); the Gaussian and "
           "SD rows are unguided. A window's DDIM-8 is PeRFlow's 8 teacher steps per window.", ""]
    for key in args.only or list(makers):
        start = time.perf_counter()
        name, rows = measure(makers[key], args.batch)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        doc += [f"## {name}", "", *verdict(rows), "", *table(rows), ""]
        Path(args.out).write_text("\n".join(doc))
        print("\n".join(verdict(rows)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
