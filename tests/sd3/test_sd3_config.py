"""configs/sd3.yaml: a valid recipe whose setup keys the SD3 builder takes, each setting with its source,
and trained through the CLI on the tiny SD3 pipeline."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from proreflow.sd3.setup import build_sd3_setup
from proreflow.training.recipes import load_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sd3.yaml"


def test_config_is_a_valid_recipe_with_sources():
    recipe, setup = load_config(CONFIG, ["setup.data=somewhere"])
    assert [s.windows for s in recipe.stages] == [8, 4] and recipe.stages[0].solver_steps == 4
    assert setup["name"] == "stable-diffusion-3" and setup["window_space"] == "sigma"
    assert set(setup) - {"name"} <= set(inspect.signature(build_sd3_setup).parameters)
    for line in CONFIG.read_text().splitlines():
        value = line.split("#")[0]
        key = value.strip().split(":")[0]
        if line.startswith((" ", "mixed_precision")) and ":" in value and key not in ("name", "teacher", "data"):
            assert any(tag in line for tag in ("[P]", "[R]", "[D]", "[ours]")), f"no source for {line.strip()!r}"


def test_config_trains_through_the_cli(sd3_dir, image_dir, tmp_path):
    from proreflow.cli import main

    overrides = [f"setup.teacher={sd3_dir}", f"setup.data={image_dir}", "setup.resolution=16", "setup.use_t5=false",
                 "setup.encoder_dtype=float32", "gradient_checkpointing=false", "mixed_precision='no'",
                 "stages.*.steps=1", "defaults.batch_size=2", "defaults.grad_accum=1", "defaults.warmup_steps=0",
                 "stages.0.solver_steps=1", "setup.window_space=unshifted"]
    assert main(["train", "--config", str(CONFIG), "--out", str(tmp_path / "run"), "--no-progress", *overrides]) == 0
    info = json.loads((tmp_path / "run" / "student.json").read_text())
    assert info["prediction_type"] == "flow_velocity" and "unshifted" in json.dumps(info)


def test_the_accelerate_fsdp_config_names_the_blocks_of_the_transformer():
    """configs/accelerate/fsdp-sd3.yaml: an FSDP2 config of accelerate whose wrap class accelerate finds in the
    SD3 transformer (its ``get_module_class_from_name``, as its auto-wrap policy looks it up)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils.dataclasses import get_module_class_from_name

    from .tiny import transformer

    config = load_config_from_file(str(CONFIG.parent / "accelerate" / "fsdp-sd3.yaml"))
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "JointTransformerBlock"
    assert get_module_class_from_name(transformer(), "JointTransformerBlock") is not None
