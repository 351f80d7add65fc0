"""configs/sd15.yaml and configs/sdxl.yaml: valid recipes, and setup keys the SD builder takes."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from proreflow.sd.setup import build_sd_setup
from proreflow.training.recipes import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name, windows, solver_steps", [("sd15", [8, 4, 2], 4), ("sdxl", [8, 4], 5)])
def test_config_is_a_valid_recipe(name, windows, solver_steps):
    text = (CONFIGS / f"{name}.yaml").read_text()
    recipe, setup = load_config(CONFIGS / f"{name}.yaml", ["setup.data=somewhere"])
    assert [s.windows for s in recipe.stages] == windows and recipe.stages[0].solver_steps == solver_steps
    assert recipe.mixed_precision == "bf16" and recipe.stages[0].guidance_mode == "cfg_sync"
    assert setup["name"] == "stable-diffusion"
    accepted = set(inspect.signature(build_sd_setup).parameters)
    assert set(setup) - {"name"} <= accepted
    # every hyperparameter (setup and stage values, precision) cites its source: [P], [R] or [ours]
    for line in text.splitlines():
        value = line.split("#")[0]
        key = value.strip().split(":")[0]
        if line.startswith((" ", "mixed_precision")) and ":" in value and key not in ("name", "teacher", "data"):
            assert any(tag in line for tag in ("[P]", "[R]", "[ours]")), f"{name}.yaml: no source for {line.strip()!r}"


def test_sd15_config_trains_through_the_cli(sd15_dir, image_dir, tmp_path):
    """The config as users run it, on the tiny pipeline: setup registered by name, 3 stages, export."""
    from proreflow.cli import main

    overrides = [f"setup.teacher={sd15_dir}", f"setup.data={image_dir}", "setup.resolution=16",
                 "setup.encoder_dtype=float32", "mixed_precision='no'", "stages.*.steps=1", "defaults.batch_size=2",
                 "defaults.grad_accum=1", "defaults.warmup_steps=0", "stages.0.solver_steps=1"]
    assert main(["train", "--config", str(CONFIGS / "sd15.yaml"), "--out", str(tmp_path / "run"), "--no-progress",
                 *overrides]) == 0
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    info = json.loads((tmp_path / "export" / "proreflow.json").read_text())
    assert info["num_windows"] == 2 and info["guidance"] == 4.0  # cfg_sync: sampled with the config's guidance


@pytest.mark.parametrize("pipe", ["sd15_dir", "sdxl_dir"])
def test_the_accelerate_fsdp_config_names_blocks_of_the_unet(pipe, request):
    """configs/accelerate/fsdp-unet.yaml: an FSDP2 config of accelerate whose wrap classes accelerate finds in
    the UNet (its ``get_module_class_from_name``, as its auto-wrap policy looks them up)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils.dataclasses import get_module_class_from_name
    from diffusers import UNet2DConditionModel

    config = load_config_from_file(str(CONFIGS / "accelerate" / "fsdp-unet.yaml"))
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    unet = UNet2DConditionModel.from_pretrained(request.getfixturevalue(pipe), subfolder="unet")
    names = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert names == ["BasicTransformerBlock", "ResnetBlock2D"]
    for name in names:
        assert get_module_class_from_name(unet, name) is not None
