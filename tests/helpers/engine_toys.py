"""Small setups for engine tests: labelled 2D Gaussian mixture data and a tiny MLP teacher (float64)."""

from __future__ import annotations

import functools
import os
import signal

import torch
from torch import nn
from torch.utils.data import Dataset

from proreflow.schedules import VPSchedule
from proreflow.training import DistillationSetup
from proreflow.training.batches import BatchPlan

CLASSES = 3


class MLP(nn.Module):
    """``net(x, timestep, cond)``: a 2D eps-network with a class embedding (index CLASSES = null)."""

    def __init__(self, seed: int = 0, hidden: int = 32):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(CLASSES + 1, hidden)
        self.inp = nn.Linear(3, hidden)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))
        self.double()
        self.poison = False  # when set, outputs are NaN (to test non-finite loss handling)

    def forward(self, x, timestep, cond):
        h = self.inp(torch.cat([x, timestep[:, None].to(x.dtype) / 1000], dim=1))
        if cond is not None:
            h = h + self.embed(cond)
        out = self.out(h)
        return out * float("nan") if self.poison else out


class Mixture(Dataset):
    """``n`` points of a 3-component 2D Gaussian mixture, with their component as the condition."""

    def __init__(self, n: int = 64, conditional: bool = True):
        g = torch.Generator().manual_seed(1)
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)
        centers = torch.tensor([[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]], dtype=torch.float64)
        self.x = centers[self.labels] + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)
        self.conditional = conditional

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], (self.labels[i] if self.conditional else None)


class CrashingMixture(Mixture):
    """A Mixture of ``n`` points that raises at its ``crash_at``-th item read (a run killed mid-stage)."""

    def __init__(self, crash_at: int, n: int = 64):
        super().__init__(n)
        self.calls, self.crash_at = 0, crash_at

    def __getitem__(self, i):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("simulated crash")
        return super().__getitem__(i)


class CtrlCAt(Mixture):
    """Sends this process SIGINT (Ctrl-C) when item ``at`` (1-based) is read."""

    def __init__(self, at: int):
        super().__init__()
        self.calls, self.at = 0, at

    def __getitem__(self, i):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().__getitem__(i)


class SkippingMixture(Mixture):
    """A Mixture whose item ``i`` names ``gone-(i - 1)`` as skipped to reach it when ``i % 5 == 1``
    (the ``(x0, cond, skipped)`` items of DistillationSetup.dataset)."""

    def __getitem__(self, i):
        x, c = super().__getitem__(i)
        return (x, c, [f"gone-{i - 1}"]) if i % 5 == 1 else (x, c)


def skipped_per_step(n: int, seed: int, stage: int, batch_size: int, steps: int) -> list[str]:
    """The names SkippingMixture(n) reports in a stage: each step's sorted, step after step."""
    plan = BatchPlan(n, seed, stage, batch_size, 1)
    return [name for s in range(steps)
            for name in sorted(f"gone-{i - 1}" for i in plan.indices(plan.positions(s, 0)) if i % 5 == 1)]


SCHEDULE = VPSchedule.from_betas()  # Stable Diffusion's scaled-linear schedule


@functools.lru_cache(maxsize=1)
def teacher_weights() -> dict:
    """An eps-prediction teacher fitted to the mixture (300 Adam steps, with 10% null-class dropout)."""
    net, data = MLP(0), Mixture(512)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(300):
        i = torch.randint(0, len(data), (128,), generator=g)
        x0, label = data.x[i], data.labels[i]
        label = torch.where(torch.rand(128, generator=g) < 0.1, CLASSES, label)
        t = torch.rand(128, generator=g, dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        loss = (net(SCHEDULE.add_noise(x0, eps, t), SCHEDULE.timestep(t), label) - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def make_setup(n: int = 64, conditional: bool = True, from_scratch_seed: int | None = None,
               pretrained: bool = True) -> DistillationSetup:
    teacher = MLP(0)
    if pretrained:
        teacher.load_state_dict(teacher_weights())
    return DistillationSetup(
        teacher_model=teacher, prediction_type="epsilon", schedule=SCHEDULE, dataset=Mixture(n, conditional),
        uncond=torch.tensor([CLASSES]) if conditional else None,
        make_student=(lambda: MLP(from_scratch_seed)) if from_scratch_seed is not None else None,
        info={"dataset": "mixture"})


def tiny_recipe(**changes) -> dict:
    """A two-stage 4 -> 2 recipe that runs in well under a second."""
    recipe = {"name": "tiny", "seed": 0, "checkpoint_every": 0, "log_every": 1,
              "defaults": {"lr": 1e-3, "batch_size": 8, "steps": 6, "ema_decay": 0.9, "warmup_steps": 2,
                           "solver_steps": 2},
              "stages": [{"windows": 4}, {"windows": 2, "teacher": "previous", "solver_steps": None}]}
    recipe.update(changes)
    return recipe


class Adapted(nn.Module):
    """A LoRA-like network: the teacher MLP frozen as its base, plus a trainable low-rank adapter
    ``up(down(x, t))`` on the output, zero at the start (``up = 0``), so it is the teacher."""

    def __init__(self, rank: int = 2):
        super().__init__()
        self.base = MLP(0)
        self.base.load_state_dict(teacher_weights())
        self.base.requires_grad_(False)
        torch.manual_seed(3)
        self.down = nn.Linear(3, rank, bias=False).double()
        self.up = nn.Linear(rank, 2, bias=False).double()
        nn.init.zeros_(self.up.weight)

    def forward(self, x, timestep, cond):
        h = torch.cat([x, timestep[:, None].to(x.dtype) / 1000], dim=1)
        return self.base(x, timestep, cond) + self.up(self.down(h))


ADAPTER = ("down.weight", "up.weight")


def make_adapted_setup() -> DistillationSetup:
    setup = make_setup()
    setup.teacher_model = Adapted()
    return setup
