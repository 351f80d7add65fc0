"""Teacher evaluations per training sample on the proreflow-ii recipe, with and without trajectory reuse.

Runs the ``proreflow-ii`` preset (8 -> 4 -> 2 windows, 4 / 8 / 16 DDIM steps per window: one 32-step grid)
on the built-in ``moons`` data in three modes and counts the teacher's network evaluations with a wrapper on
the teacher network (independent of the engine's own counter, which is checked against it):

- ``data``: forward-noised data start points (PeRFlow's choice; the engine's default);
- ``teacher``: teacher start points solved online, each sample from its noise to the end of its window;
- ``cached``: teacher start points read from the target cache: one trajectory per item (32 evaluations),
  solved once and read by all three stages; at several item counts (``max_train_samples``).

The teacher is the built-in moons architecture with random weights: the counts do not depend on the weights
(the preset is unguided; a guided evaluation would count 2). Writes a JSON record and prints a Markdown table.

    python3 benchmarks/trajectory_reuse.py [--steps 1000] [--items 50000 2000] [--out docs/research/runs/...]
    python3 benchmarks/trajectory_reuse.py --table docs/research/runs/trajectory-reuse.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
from pathlib import Path

import torch
from torch import nn

from proreflow.builtin.data import load_dataset
from proreflow.builtin.networks import adapter_for_spec, build_network
from proreflow.builtin.teacher import teacher_config
from proreflow.training import DistillationSetup, train
from proreflow.training.recipes import load_recipe


class CountingModule(nn.Module):
    """A network that counts the samples it is evaluated on (a copy, e.g. the student, counts apart)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x, timestep, cond):
        self.calls += x.shape[0]
        return self.inner(x, timestep, cond)


def moons_setup() -> DistillationSetup:
    config = teacher_config("moons")
    torch.manual_seed(0)
    teacher = CountingModule(build_network(config.network))
    inner = adapter_for_spec(config.network)
    return DistillationSetup(teacher_model=teacher, prediction_type="epsilon", schedule=config.schedule(),
                             dataset=load_dataset("moons", "train", seed=config.seed),
                             adapter=lambda module: inner(module))


def run(mode: str, steps: int, items: int | None, work: Path) -> dict:
    overrides = [f"stages.*.steps={steps}", "checkpoint_every=0", f"log_every={10 * steps}"]
    if mode != "data":
        overrides.append("stages.*.start_points=teacher")
    if mode == "cached":
        overrides.append(f"target_cache={work / 'cache'}")
    if items is not None:
        overrides.append(f"max_train_samples={items}")
    recipe = load_recipe("proreflow-ii", overrides)
    setup = moons_setup()
    result = train(recipe, setup, work / f"{mode}-{items}", progress=False)
    counted, engine = setup.teacher_model.calls, sum(s.teacher_evals for s in result.stages)
    if counted != engine:
        raise RuntimeError(f"{mode}: the network counted {counted} teacher evaluations, the engine {engine}")
    samples = sum(s.samples for s in result.stages)
    return {"mode": mode, "items": items if items is not None else len(setup.dataset), "samples": samples,
            "teacher_evals": counted, "per_stage": [s.teacher_evals for s in result.stages],
            "per_stage_samples": [s.samples for s in result.stages], "evals_per_sample": counted / samples}


def table(record: dict) -> str:
    """The Markdown table of a record."""
    lines = ["| start points | items (trajectories) | training samples | teacher evaluations, 8w / 4w / 2w stage "
             "| per training sample, 8w / 4w / 2w | per training sample, all stages |",
             "|---|---:|---:|---|---|---:|"]
    for row in record["rows"]:
        stages = " / ".join(f"{e:,}" for e in row["per_stage"])
        per = " / ".join(f"{e / n:.2f}" for e, n in zip(row["per_stage"], row["per_stage_samples"], strict=True))
        items = f"{row['items']:,}" if row["mode"] == "cached" else "-"
        total = f"{row['evals_per_sample']:.2f}"
        lines.append(f"| {row['mode']} | {items} | {row['samples']:,} | {stages} | {per} | {total} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps per stage (the preset: 1000)")
    parser.add_argument("--items", type=int, nargs="+", default=[50_000, 2_000],
                        help="dataset items (trajectories) of the cached runs")
    parser.add_argument("--out", type=Path, default=Path("docs/research/runs/trajectory-reuse.json"))
    parser.add_argument("--table", type=Path, help="only print the table of this record (no runs)")
    args = parser.parse_args()
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, items in [("data", None), ("teacher", None), *(("cached", n) for n in args.items)]:
            rows.append(run(mode, args.steps, items, Path(tmp) / f"{mode}-{items}"))
            print(json.dumps(rows[-1]), flush=True)
    record = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, torch {torch.__version__}", "recipe": "proreflow-ii",
              "steps_per_stage": args.steps, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print("\n" + table(record))


if __name__ == "__main__":
    main()
