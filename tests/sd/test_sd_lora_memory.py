"""benchmarks/lora_memory.py counts the bytes the engine really holds in a LoRA distillation."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from proreflow.sd.setup import build_sd_setup
from proreflow.training import StageRunner

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lora_memory.py"


def _bench():
    spec = importlib.util.spec_from_file_location("lora_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_the_engine_holds_exactly_the_bytes_of_the_memory_table(sd15_dir, image_dir, precision):
    bench = _bench()
    recipe = {"name": "tiny", "checkpoint_every": 0, "log_every": 1, "seed": 3, "mixed_precision": precision,
              "stages": [{"windows": 2, "steps": 1, "batch_size": 2, "lr": 1e-3, "solver_steps": 1}]}
    held = {}
    for mode in ("one", "two"):
        setup = build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), device="cpu", lora_rank=4)
        if mode == "two":
            setup = dataclasses.replace(setup, teacher_view=None)  # the old way: a frozen teacher copy
        named = list(setup.teacher_model.named_parameters())
        lora = sum(p.numel() for n, p in named if "lora_" in n)
        base = sum(p.numel() for n, p in named) - lora
        with StageRunner(recipe, setup) as runner:
            runner.step()
            held[mode] = bench.held_bytes(runner)
        counted = bench.static_bytes(base, lora, mode, precision)
        assert held[mode] == sum(counted.values()) - counted["LoRA grads"]  # freed after the step
    width = bench.BYTES[precision]  # one network: the frozen base at the mixed-precision width (the teacher's)
    assert held["two"] - held["one"] == width * (base + lora) + (4 - width) * base  # the teacher copy, float32 base
