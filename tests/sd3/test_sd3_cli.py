"""``proreflow export`` / ``sample`` / ``eval`` on a tiny SD3 run: the family comes from the run / pipeline.

True answers: the exported transformer is the run's student; ``sample``'s PNGs are ``proreflow.sample`` of
the student from the seeded noise, decoded (to a level of float rounding); ``eval``'s numbers are the
metrics, computed here directly, of the teacher's own Euler-4 (the stock pipeline) and of the student at 2
and 4 steps (the stock pipeline at ``window_sigmas``, itself ``proreflow.sample`` to a level of rounding).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from proreflow import Denoiser, TimeWindows, sample
from proreflow.cli import main
from proreflow.evaluation.fidelity import fidelity
from proreflow.sd.export import load_run_student
from proreflow.sd.fid import FID, to_uint8_rgb
from proreflow.sd.t2i import prompt_noise, psnr
from proreflow.sd3.export import read_export_info, window_sigmas
from proreflow.sd3.pipeline import load_sd3_teacher, transformer_network
from proreflow.sd3.setup import build_sd3_setup
from proreflow.training import train

GUIDANCE = 2.0
PROMPTS = ["a cat", "a dog", "red"]
RECIPE = {"name": "tiny", "checkpoint_every": 0, "seed": 0,
          "stages": [{"windows": 2, "steps": 1, "solver_steps": 1, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0,
                      "guidance": GUIDANCE}]}


@pytest.fixture(scope="module")
def sd3_run(sd3_dir, image_dir, tmp_path_factory):
    """A full fine-tuning run of one stage (2 windows, one step) and its student transformer."""
    out = tmp_path_factory.mktemp("sd3run") / "run"
    train(RECIPE, build_sd3_setup(teacher=str(sd3_dir), data=str(image_dir), device="cpu"), out, progress=False)
    teacher = load_sd3_teacher(sd3_dir)
    student, _ = load_run_student(out, teacher.transformer, "stable-diffusion-3")
    return out, teacher, student


def decoded_sample(teacher, model, noise, steps: int, prompts, guidance: float) -> torch.Tensor:
    """uint8 images of ``proreflow.sample`` of ``model`` (2 windows), as a PNG holds them."""
    denoiser = Denoiser(transformer_network(model), "flow_velocity", teacher.schedule())
    cond = teacher.encode_prompts(prompts)
    null = {k: v.expand(len(prompts), *v.shape[1:]) for k, v in teacher.null_cond().items()}
    latents = sample(denoiser, noise, TimeWindows(2), steps, cond, null, guidance)
    return to_uint8_rgb((teacher.decode_latents(latents) + 1) / 2)


def png(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)


def test_export_and_sample_an_sd3_run(sd3_run, sd3_dir, tmp_path, capsys):
    run, teacher, student = sd3_run
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export")]) == 0
    info = read_export_info(tmp_path / "export")
    assert info["sigmas"] == window_sigmas(teacher.schedule(), TimeWindows(2)) and info["num_windows"] == 2
    assert f"sigmas={info['sigmas']}" in capsys.readouterr().out
    saved = load_file(str(tmp_path / "export/transformer/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in student.state_dict().items())
    assert (tmp_path / "export/README.md").is_file()

    guidance = info["guidance"]
    assert main(["sample", "--model", str(tmp_path / "export"), "--prompt", "a cat", "--num-images", "2",
                 "--seed", "5", "--steps", "4", "--out", str(tmp_path / "png")]) == 0
    noise = torch.cat([torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5 + k)) for k in range(2)])
    want = decoded_sample(teacher, student, noise, 4, ["a cat"] * 2, guidance)
    for k in range(2):  # float rounding may move a pixel by one level
        assert (png(tmp_path / f"png/000-{k}.png").int() - want[k].int()).abs().max() <= 1

    # windows uniform in the unshifted s: more steps than windows are not the stock sampler, refused in one line
    export_info = tmp_path / "export/proreflow.json"
    export_info.write_text(json.dumps({**info, "window_space": "unshifted"}))
    capsys.readouterr()
    assert main(["sample", "--model", str(tmp_path / "export"), "--prompt", "a cat", "--steps", "3",
                 "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err  # after diffusers' loading progress bars: the error, one line
    assert err.endswith("only at one step per window; use 2 steps\n") and "Traceback" not in err
    assert err.splitlines()[-1].startswith("proreflow sample: error: 3 steps: a student with windows uniform")
    assert not list((tmp_path / "refused").glob("*.png"))

    assert main(["export", "--run", str(run), "--out", str(tmp_path / "lora"), "--lora", "--lora-rank", "4"]) == 0
    assert (tmp_path / "lora/pytorch_lora_weights.safetensors").is_file()
    assert read_export_info(tmp_path / "lora")["base"] == str(sd3_dir)
    assert main(["sample", "--model", str(sd3_dir), "--lora", str(tmp_path / "lora"), "--prompt", "a dog",
                 "--out", str(tmp_path / "lora-png")]) == 0
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(tmp_path / "lora")  # the student the LoRA holds (rank 4 of the full change)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    want = decoded_sample(teacher, pipe.transformer, noise, 2, ["a dog"], guidance)
    assert (png(tmp_path / "lora-png/000-0.png").int() - want[0].int()).abs().max() <= 1


def test_eval_numbers_are_the_metrics_of_the_samplers(sd3_run, sd3_dir, feature_file, tmp_path, capsys):
    run, teacher, student = sd3_run
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export")]) == 0
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "eval"
    assert main(["eval", "--teacher", str(sd3_dir), "--student", str(tmp_path / "export"), "--prompts",
                 str(tmp_path / "prompts.txt"), "--steps", "1,2,4", "--teacher-steps", "4", "--guidance",
                 str(GUIDANCE), "--inception", str(feature_file), "--batch-size", "3", "--workers", "0",
                 "--fid-cache", str(tmp_path / "cache"), "--grid-prompts", "2", "--out", str(out)]) == 0
    payload = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in payload["results"]}
    assert list(rows) == ["teacher Euler-4", "student 1-step", "student 2-step", "student 4-step"]
    assert "cannot cover 2 windows" in rows["student 1-step"]["skipped"]
    assert payload["settings"]["teacher_scheduler"] == "FlowMatchEulerDiscreteScheduler(shift=3.0), 4 steps"
    assert (out / "results.md").is_file() and (out / "grids/prompt_001.png").is_file()

    noise = prompt_noise(0, range(len(PROMPTS)), (4, 8, 8))

    def stock(pipe, **steps) -> torch.Tensor:
        latents = pipe(PROMPTS, guidance_scale=GUIDANCE, latents=noise, output_type="latent", **steps).images
        return to_uint8_rgb((teacher.decode_latents(latents) + 1) / 2)

    teacher_images = stock(teacher.pipe, num_inference_steps=4)  # the teacher's own Euler-4
    student_pipe = copy.copy(teacher.pipe)
    student_pipe.register_modules(transformer=student)
    fid = FID(feature_file)
    teacher_stats = fid.accumulator()
    teacher_stats.update(teacher_images)
    for steps in (2, 4):
        images = stock(student_pipe, sigmas=window_sigmas(teacher.schedule(), TimeWindows(2), steps))
        # the stock sampler at the window sigmas is proreflow.sample (to float rounding: a level at most)
        assert (images.int() - decoded_sample(teacher, student, noise, steps, PROMPTS, GUIDANCE).int()).abs().max() <= 1
        stats = fid.accumulator()
        stats.update(images)
        row = rows[f"student {steps}-step"]
        assert row["rmse_to_teacher"] == pytest.approx(fidelity(images.float() / 255, teacher_images.float() / 255),
                                                       rel=1e-9)
        # per-image PSNRs are float32: their sum and their mean round differently
        assert row["psnr_to_teacher"] == pytest.approx(float(psnr(images, teacher_images).mean()), rel=1e-6)
        assert row["fid_to_teacher"] == pytest.approx(fid.distance(teacher_stats.stats(), stats.stats()), rel=1e-9)
        assert row["images"] == 3 and row["fid"] is None and row["clip_score"] is None
        assert row["rmse_to_teacher"] > 0


@pytest.mark.parametrize("command", ["eval-teacher", "eval-student", "sample", "export"])
def test_a_folder_of_another_family_is_one_line_and_exit_2(command, sd3_dir, feature_file, tmp_path, capsys):
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    sd15 = tmp_path / "sd15"
    sd15.mkdir()
    (sd15 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "student.json").write_text(json.dumps({"windows": 2, "info": {"model": "digits", "teacher": str(sd3_dir)}}))
    save_file({"w": torch.zeros(1)}, str(run / "student.safetensors"))  # a complete file: checked first
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    eval_args = ["eval", "--prompts", str(tmp_path / "prompts.txt"), "--inception", str(feature_file),
                 "--fid-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    argv, named = {
        "eval-teacher": ([*eval_args, "--teacher", str(flux), "--student", str(sd3_dir)], "FluxPipeline"),
        "eval-student": ([*eval_args, "--teacher", str(sd3_dir), "--student", str(sd15)], "StableDiffusionPipeline"),
        "sample": (["sample", "--model", str(flux), "--prompt", "a cat", "--out", str(tmp_path / "out")],
                   "FluxPipeline"),
        "export": (["export", "--run", str(run), "--out", str(tmp_path / "out")], "'digits' run"),
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
