"""configs/pixart.yaml: a valid recipe whose setup keys the PixArt builder takes, each setting with its source,
and trained through the CLI on the tiny PixArt-alpha pipeline."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from proreflow.pixart.setup import build_pixart_setup
from proreflow.training.recipes import load_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pixart.yaml"


def test_config_is_a_valid_recipe_with_sources():
    recipe, setup = load_config(CONFIG, ["setup.data=somewhere"])
    assert [s.windows for s in recipe.stages] == [8, 4] and recipe.stages[0].solver_steps == 4
    stage = recipe.stages[0]
    assert (stage.lr, stage.adam_epsilon, stage.grad_clip, stage.guidance) == (2e-5, 1e-10, 0.01, 4.5)
    assert setup["name"] == "pixart" and set(setup) - {"name"} <= set(inspect.signature(build_pixart_setup).parameters)
    for line in CONFIG.read_text().splitlines():
        value = line.split("#")[0]
        key = value.strip().split(":")[0]
        if line.startswith((" ", "mixed_precision")) and ":" in value and key not in ("name", "teacher", "data"):
            assert any(tag in line for tag in ("[P]", "[X]", "[R]", "[D]", "[ours]")), f"no source for {line.strip()!r}"


def test_config_trains_through_the_cli(alpha_dir, image_dir, tmp_path):
    from proreflow.cli import main

    overrides = [f"setup.teacher={alpha_dir}", f"setup.data={image_dir}", "setup.resolution=16",
                 "setup.encoder_dtype=float32", "mixed_precision='no'",
                 "stages.*.steps=1", "defaults.batch_size=2", "defaults.grad_accum=1", "defaults.warmup_steps=0",
                 "stages.0.solver_steps=1"]
    assert main(["train", "--config", str(CONFIG), "--out", str(tmp_path / "run"), "--no-progress", *overrides]) == 0
    info = json.loads((tmp_path / "run" / "student.json").read_text())
    assert info["prediction_type"] == "epsilon" and info["info"]["model"] == "pixart"
    assert info["info"]["size_conditions"] is True and info["windows"] == 4


def test_a_trained_run_exports_through_the_cli(alpha_dir, image_dir, tmp_path):
    """``proreflow export`` of a pixart run writes the stock pipeline whose transformer is the run's student
    (its weights exactly) and whose scheduler is the trailing DDIM; ``--lora`` is one line and exit 2."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline
    from safetensors.torch import load_file

    from proreflow.cli import main

    overrides = [f"setup.teacher={alpha_dir}", f"setup.data={image_dir}", "setup.resolution=16",
                 "setup.encoder_dtype=float32", "mixed_precision='no'", "stages=[{windows: 2, steps: 1}]",
                 "defaults.batch_size=2", "defaults.grad_accum=1", "defaults.warmup_steps=0", "defaults.solver_steps=1"]
    assert main(["train", "--config", str(CONFIG), "--out", str(tmp_path / "run"), "--no-progress", *overrides]) == 0
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    pipe = PixArtAlphaPipeline.from_pretrained(tmp_path / "export")
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.timestep_spacing == "trailing"
    trained = load_file(str(tmp_path / "run" / "student.safetensors"))
    exported = pipe.transformer.state_dict()
    assert trained.keys() == exported.keys()
    assert all(torch.equal(trained[k], exported[k]) for k in trained)
    info = json.loads((tmp_path / "export" / "proreflow.json").read_text())
    assert (info["num_windows"], info["resolution"]) == (2, 16)
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "lora"), "--lora"]) == 2
