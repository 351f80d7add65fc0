"""An any-step Stable Diffusion student (issue 25): trained with step conditioning through the engine, exported once
per step count with ``proreflow export --steps N``; each folder is a stock pipeline that draws, in a fresh Python
without proreflow, what the conditioned student draws at that count."""

from __future__ import annotations

import copy
import json

import pytest
from safetensors.torch import load_file

from proreflow import TimeWindows, sample
from proreflow.cli import main as cli
from proreflow.sd.pipeline import load_teacher
from proreflow.sd.setup import build_sd_setup
from proreflow.step_conditioning import attach_step_conditioning
from proreflow.training import train
from proreflow.training.student import load_student_weights

from .test_sd_export import GUIDANCE, IMAGE_TOL, LATENT_TOL, PROMPTS, fresh_sample, max_diff, noise_for

RECIPE = {"name": "any-step", "checkpoint_every": 0, "step_conditioning": True, "mixed_precision": "no",
          "defaults": {"batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "ema_decay": 0.0, "guidance": GUIDANCE,
                       "guidance_mode": "cfg_sync", "cond_dropout": 0.25},
          "stages": [{"windows": 2, "steps": 3, "solver_steps": 1, "extra_windows": [1]}]}


@pytest.fixture(scope="module")
def any_step_run(sd15_dir, image_dir, tmp_path_factory):
    setup = build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), device="cpu")
    out = tmp_path_factory.mktemp("run") / "any-step"
    train(RECIPE, setup, out, progress=False)
    return setup, out


def conditioned_student(setup, out):
    """The run's student as trained: the teacher's UNet with step conditioning and the run's weights."""
    module = copy.deepcopy(load_teacher(setup.info["teacher"]).unet)
    attach_step_conditioning(module, json.loads((out / "student.json").read_text())["step_counts"])
    load_student_weights(module, load_file(str(out / "student.safetensors")))
    return setup.denoiser(module.eval())


def test_each_exported_step_count_samples_like_the_conditioned_student(any_step_run, tmp_path):
    setup, out = any_step_run
    info = json.loads((out / "student.json").read_text())
    assert info["step_counts"] == [2, 1] and info["served_windows"] == [2, 1]
    offsets = load_file(str(out / "student.safetensors"))["step_conditioning.offsets.1"]
    assert offsets.abs().amax(1).gt(0).all()  # both counts' offsets trained away from zero
    student = conditioned_student(setup, out)
    teacher = load_teacher(setup.info["teacher"])
    noise = noise_for(teacher)
    cond, uncond = teacher.encode_prompts(PROMPTS), teacher.null_cond()
    drawn = {}
    for steps in (2, 1):
        folder = tmp_path / f"export-{steps}"
        assert cli(["export", "--run", str(out), "--out", str(folder), "--steps", str(steps)]) == 0
        export_info = json.loads((folder / "proreflow.json").read_text())
        assert export_info["num_windows"] == steps and export_info["served_steps"] == [2, 1]
        assert "2 / 1" in (folder / "README.md").read_text()
        latents, images, _ = fresh_sample(tmp_path, "StableDiffusionPipeline", folder, noise, steps)
        want = sample(student, noise, TimeWindows(steps), steps, cond, uncond, GUIDANCE)
        want_images = ((teacher.decode_latents(want) + 1) / 2).permute(0, 2, 3, 1)
        assert max_diff(latents, want) < LATENT_TOL and max_diff(images, want_images) < IMAGE_TOL
        drawn[steps] = want
    # the 2-step export is not the 1-step student run twice: the counts are different networks
    unconditioned = sample(student.at_windows(1), noise, TimeWindows(2), 2, cond, uncond, GUIDANCE)
    assert max_diff(unconditioned, drawn[2]) > 10 * LATENT_TOL


def test_export_of_an_any_step_student_needs_a_served_count(any_step_run, tmp_path, capsys):
    _, out = any_step_run
    assert cli(["export", "--run", str(out), "--out", str(tmp_path / "a")]) == 2
    assert "choose one with --steps N" in capsys.readouterr().err
    assert cli(["export", "--run", str(out), "--out", str(tmp_path / "b"), "--steps", "4"]) == 2
    assert "trained for 2/1 steps" in capsys.readouterr().err
    assert cli(["export", "--run", str(out), "--out", str(tmp_path / "c"), "--steps", "2", "--lora"]) == 2
    assert "LoRA weights do not carry" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abc")


def test_a_lora_student_cannot_be_step_conditioned(sd15_dir, image_dir, tmp_path, capsys):
    setup = build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), device="cpu", lora_rank=4)
    with pytest.raises(ValueError, match="LoRA student shares the teacher's network"):
        train(RECIPE, setup, tmp_path / "run", progress=False)
