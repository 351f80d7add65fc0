"""Where a one-step-per-window sampler goes wrong: a trained 2-window student at its window starts.

For the student of a finished built-in run (``OUT`` of ``proreflow train`` or a quality-benchmark run
folder), on ``--samples`` held-out conditions with fresh noise, prints the RMS distance of the
student's one-step landing ``x_t + (t_end - t) v(x_t, t)`` to the teacher's landing (``--solver-steps``
guided DDIM steps over the window), beside the guided teacher's own one DDIM step:

- in the first window, at its start t = 1 (from pure noise and from noised data) and at points of the
  straight segment just after it;
- in the second window, at its start, from the teacher's landing and from the student's own.

Usage::

    python benchmarks/window_starts.py RUN_DIR [--data mnist] [--guidance 2] [--samples 256]

Exploratory (docs/research/2026-quality-study.md, issue 13 round 2): it located the error that ``start_share`` removes.
"""

from __future__ import annotations

import argparse

import torch

from proreflow.builtin.data import load_dataset
from proreflow.builtin.teacher import builtin_setup
from proreflow.solvers import solve
from proreflow.training.student import load_student


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).flatten(1).pow(2).mean(1).sqrt().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="run folder with a finished 2-window student")
    p.add_argument("--data", default="mnist")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--solver-steps", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    setup = builtin_setup(args.data, progress=False)
    teacher = setup.denoiser(setup.teacher_model)
    student, windows = load_student(args.run, setup)
    if windows.count != 2:
        p.error(f"{args.run} holds a {windows.count}-window student; this check is written for 2 windows")
    test = load_dataset(args.data, "test")
    g = torch.Generator().manual_seed(123)
    n, w = args.samples, args.guidance
    idx = torch.randint(len(test), (n,), generator=g)
    x0, cond = test.x[idx], test.labels[idx]
    noise = torch.randn(x0.shape, generator=g)
    uncond = setup.uncond

    def land(model, x, t, s, guided):
        tt, ss = torch.full((n,), t), torch.full((n,), s)
        v = model.velocity(x, tt, ss, cond, uncond if guided else None, w if guided else 1.0)
        return x + (s - t) * v

    with torch.no_grad():
        noised = setup.schedule.add_noise(x0, noise, torch.ones(n))
        for name, x1 in (("pure noise", noise), ("noised data", noised)):
            mid = solve(teacher, x1, 1.0, 0.5, args.solver_steps, cond, uncond, w)
            print(f"{name}: window 1 at t = 1: student {rms(land(student, x1, 1.0, 0.5, False), mid):.4f}, "
                  f"guided DDIM step {rms(land(teacher, x1, 1.0, 0.5, True), mid):.4f}")
            for t in (0.99, 0.97, 0.94):
                xt = x1 + (t - 1.0) * (mid - x1) / -0.5
                print(f"  on the segment at t = {t}: student {rms(land(student, xt, t, 0.5, False), mid):.4f}, "
                      f"guided DDIM step {rms(land(teacher, xt, t, 0.5, True), mid):.4f}")
            end = solve(teacher, mid, 0.5, 0.0, args.solver_steps, cond, uncond, w)
            print(f"  window 2 at t = 0.5 from the teacher's landing: student "
                  f"{rms(land(student, mid, 0.5, 0.0, False), end):.4f}, guided DDIM step "
                  f"{rms(land(teacher, mid, 0.5, 0.0, True), end):.4f}")
            own = land(student, x1, 1.0, 0.5, False)
            end_own = solve(teacher, own, 0.5, 0.0, args.solver_steps, cond, uncond, w)
            print(f"  window 2 at t = 0.5 from the student's landing: student "
                  f"{rms(land(student, own, 0.5, 0.0, False), end_own):.4f}")


if __name__ == "__main__":
    main()
