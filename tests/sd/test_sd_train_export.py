"""Training through the engine (two stages), export as a pipeline and as LoRA, sampling from both."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from proreflow import Denoiser, TimeWindows, sample
from proreflow.cli import main as cli
from proreflow.sd import ProReflowScheduler
from proreflow.sd.export import export_lora, export_pipeline, load_run_student, read_export_info
from proreflow.sd.lora import extract_lora
from proreflow.sd.pipeline import load_teacher, unet_network
from proreflow.sd.setup import build_sd_setup
from proreflow.training import train
from proreflow.training.batches import BatchPlan
from proreflow.training.recipes import load_recipe

RECIPE = {"name": "tiny", "checkpoint_every": 0, "log_every": 1,
          "defaults": {"batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "guidance": 2.0, "ema_decay": 0.5},
          "stages": [{"windows": 2, "steps": 2, "solver_steps": 2}, {"windows": 1, "steps": 2, "teacher": "previous"}]}


def weights_changed(a, b) -> list[str]:
    sb = b.state_dict()
    return [k for k, v in a.state_dict().items() if not torch.equal(v, sb[k])]


@pytest.fixture(scope="module")
def sd15_run(sd15_dir, image_dir, tmp_path_factory):
    """Full fine-tuning on the folder with a corrupt image, encoded on the fly."""
    setup = build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), device="cpu")
    out = tmp_path_factory.mktemp("run") / "sd15"
    result = train(RECIPE, setup, out, progress=False)
    return setup, result, out


def test_training_skips_and_reports_the_corrupt_image(sd15_run, image_dir):
    setup, result, out = sd15_run
    assert list(setup.dataset.skipped) == [str(image_dir / "broken.jpg")]
    assert [s.steps for s in result.stages] == [2, 2] and all(torch.isfinite(torch.tensor(result.history)).all(1))
    info = json.loads((out / "student.json").read_text())
    assert info["windows"] == 1 and info["info"]["model"] == "stable-diffusion"
    assert list(info["info"]["skipped_images"]) == [str(image_dir / "broken.jpg")]  # in the run's record
    assert "truncated" in info["info"]["skipped_images"][str(image_dir / "broken.jpg")]
    student, _ = load_run_student(out, load_teacher(setup.info["teacher"]).unet)
    assert weights_changed(student, load_teacher(setup.info["teacher"]).unet)


def skipped_reads(recipe: dict, num_items: int, broken: int) -> int:
    """How often the batch plan reads item ``broken`` in stage 1 (each read is skipped and counted)."""
    stage = recipe["stages"][0]
    plan = BatchPlan(num_items, load_recipe(recipe).seed, 0, recipe["defaults"]["batch_size"], 1)
    return plan.indices(range(stage["steps"] * recipe["defaults"]["batch_size"])).count(broken)


def test_skipped_images_reach_the_summary_from_loader_workers(sd15_dir, image_dir, tmp_path):
    """Encoding on the fly, the skips of the loader's worker processes are counted as in-process ones."""
    broken = str(image_dir / "broken.jpg")
    summaries = {}
    for workers in (0, 2):
        recipe = {**RECIPE, "num_workers": workers, "stages": [{"windows": 2, "steps": 4, "solver_steps": 1}]}
        setup = build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), device="cpu")
        train(recipe, setup, tmp_path / f"run{workers}", progress=False)
        summaries[workers] = json.loads((tmp_path / f"run{workers}" / "summary.json").read_text())[0]
        if workers:
            assert setup.dataset.skipped == {}  # the main process read nothing itself
    num_items = len(setup.dataset)
    index = [setup.dataset.items.source.record(i).name for i in range(num_items)].index(broken)
    expected = skipped_reads(recipe, num_items, index)
    assert expected >= 1  # 4 steps x 2 samples cover the 7 items' first epoch
    for summary in summaries.values():
        assert summary["skipped_items"] == expected and summary["skipped_item_names"] == [broken]
    assert summaries[0]["final_loss"] == summaries[2]["final_loss"]  # the same batches either way


def test_sdxl_trains_from_the_latent_cache(sdxl_dir, image_dir, tmp_path):
    setup = build_sd_setup(teacher=str(sdxl_dir), data=str(image_dir), cache_dir=str(tmp_path / "cache"),
                           device="cpu")
    latents, cond = setup.dataset[0]
    # row 0: img0, 48 x 36 (h x w) -> resized to 21 x 16, center crop at y = round(2.5) = 2
    assert cond["added_cond_kwargs"]["time_ids"].tolist() == [48, 36, 2, 0, 16, 16]
    assert setup.keep_on_dropout == ("added_cond_kwargs.time_ids",)
    calls = []  # the teacher's time_ids; hooks are copied with the module, so the students' too
    setup.teacher_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True)
    result = train(RECIPE, setup, tmp_path / "run", progress=False)
    assert [s.windows for s in result.stages] == [2, 1] and len(setup.info["skipped_images"]) == 1
    guided = [ids for ids in calls if ids.shape[0] == 2 * RECIPE["defaults"]["batch_size"]]
    assert guided  # stage 1's teacher: [unconditional, conditional]; both halves with the images' time_ids
    assert all(torch.equal(ids[:2], ids[2:]) for ids in guided)
    assert any(ids[:, :2].ne(16).any() for ids in guided)  # not the null condition's (16, 16, 0, 0, 16, 16)


def test_unknown_lora_targets_are_refused_before_the_teacher_loads(tmp_path):
    with pytest.raises(ValueError, match=r"setup.lora_targets: 'convs' is not one of attention, unet"):
        build_sd_setup(teacher=str(tmp_path / "absent"), data=str(tmp_path), lora_rank=4, lora_targets="convs")


@pytest.mark.parametrize("targets", ["attention", "unet"])
def test_lora_training_changes_only_lora_weights(sd15_dir, image_dir, tmp_path, targets):
    """LoRA on the attention projections, or (``unet``, LCM-LoRA's targets) on the convolutions and time-embedding
    projections too: only LoRA weights train, and the exported LoRA on the stock pipeline is the student."""
    setup = build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), device="cpu", lora_rank=4,
                           lora_targets=targets)
    assert setup.keep_on_dropout == ()  # SD1.5 conditions are text states alone
    base = load_teacher(sd15_dir).unet
    x, cond = torch.randn(2, 4, 8, 8), {"encoder_hidden_states": torch.randn(2, 16, 32)}
    with torch.no_grad():  # zero-initialised LoRA: the teacher is unchanged
        torch.testing.assert_close(setup.teacher_model(x, 500.0, **cond).sample, base(x, 500.0, **cond).sample)
    recipe = {**RECIPE, "stages": RECIPE["stages"][:1]}
    untrained = copy.deepcopy(setup.teacher_model)  # one network in memory: the setup's UNet is trained in place
    train(recipe, setup, tmp_path / "run", progress=False)
    student, info = load_run_student(tmp_path / "run", base)
    changed = weights_changed(student, untrained)
    assert changed and all("lora_" in k for k in changed)
    adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in changed}
    assert ({"conv1", "conv2", "time_emb_proj"} <= adapted) == (targets == "unet")

    path, kept = export_lora(student, load_teacher(sd15_dir), tmp_path / "lora", info["windows"])
    assert path.is_file() and kept == 1.0
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd15_dir, safety_checker=None)
    pipe.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, 500.0, **cond).sample, student(x, 500.0, **cond).sample,
                                   rtol=1e-5, atol=1e-5)


def test_exported_pipeline_samples_like_proreflow(sd15_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    setup, result, out = sd15_run
    assert cli(["export", "--run", str(out), "--out", str(tmp_path / "export")]) == 0
    assert read_export_info(tmp_path / "export")["num_windows"] == 1
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "export")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"  # stock: loads without proreflow (test_sd_export.py)
    pipe.scheduler = ProReflowScheduler.from_config(pipe.scheduler.config, num_windows=1)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    latents = pipe("a cat", num_inference_steps=2, guidance_scale=1.0, latents=noise, output_type="latent").images
    teacher = load_teacher(setup.info["teacher"])
    cond = teacher.encode_prompts(["a cat"])
    student = Denoiser(unet_network(pipe.unet), setup.prediction_type, setup.schedule)
    want = sample(student, noise, TimeWindows(1), 2, cond)
    torch.testing.assert_close(latents, want, rtol=1e-5, atol=1e-5)
    images = pipe(["a cat", "a dog"], num_inference_steps=1, guidance_scale=1.0, output_type="np").images
    assert images.shape == (2, 16, 16, 3) and 0 <= images.min() <= images.max() <= 1

    assert cli(["sample", "--model", str(tmp_path / "export"), "--prompt", "a cat", "--prompt", "a dog",
                "--steps", "2", "--num-images", "2", "--out", str(tmp_path / "png")]) == 0
    assert sorted(p.name for p in (tmp_path / "png").glob("*.png")) == ["000-0.png", "000-1.png", "001-0.png",
                                                                        "001-1.png"]

    # the LoRA export into the same folder replaces the pipeline folder whole: nothing of it is left, nor the
    # temporary of an export killed with -9 (a dead process's); a live process's temporary is left alone
    full = {p.relative_to(tmp_path / "export") for p in (tmp_path / "export").rglob("*")}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".export.tmp-{int(dead.stdout)}" / "unet").mkdir(parents=True)
    (tmp_path / f".export.tmp-{os.getppid()}").mkdir()
    assert cli(["export", "--run", str(out), "--out", str(tmp_path / "export"), "--lora", "--lora-rank", "2"]) == 0
    lora = {p.relative_to(tmp_path / "export") for p in (tmp_path / "export").rglob("*")}
    assert Path("unet") in full and Path("unet") not in lora and "base" in read_export_info(tmp_path / "export")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [f".export.tmp-{os.getppid()}"]


def test_lora_extracted_from_a_full_student_applies_to_the_base_and_a_finetune(sd15_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    teacher = load_teacher(sd15_dir)
    student = copy.deepcopy(teacher.unet)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # low-rank weight changes: rank 4 extraction keeps all of them
        q = student.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
        q += 0.1 * torch.randn(q.shape[0], 2, generator=g) @ torch.randn(2, q.shape[1], generator=g)
        conv = student.conv_in.weight  # a 3x3 convolution: rank over (out, in * 3 * 3)
        conv += (0.1 * torch.randn(conv.shape[0], 1, generator=g) @ torch.randn(1, conv[0].numel(), generator=g)
                 ).reshape(conv.shape)
    _, kept = extract_lora(student, teacher.unet, rank=4)
    assert kept == pytest.approx(1.0, abs=1e-6)
    export_lora(student, teacher, tmp_path / "lora", num_windows=2, rank=4)
    x, cond = torch.randn(1, 4, 8, 8), {"encoder_hidden_states": torch.randn(1, 16, 32)}
    pipe = StableDiffusionPipeline.from_pretrained(sd15_dir, safety_checker=None)
    pipe.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, 300.0, **cond).sample, student(x, 300.0, **cond).sample,
                                   rtol=1e-4, atol=1e-4)
    finetune = StableDiffusionPipeline.from_pretrained(sd15_dir, safety_checker=None)
    with torch.no_grad():
        for p in finetune.unet.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
        before = finetune.unet(x, 300.0, **cond).sample
    finetune.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        assert not torch.allclose(finetune.unet(x, 300.0, **cond).sample, before)


def test_prompt_only_data_are_teacher_samples(sd15_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    setup = build_sd_setup(teacher=str(sd15_dir), prompts=str(tmp_path / "prompts.txt"), device="cpu",
                           prompt_steps=4, prompt_guidance=3.0, seed=1)
    latents, cond = setup.dataset[1]
    teacher = load_teacher(sd15_dir)
    from proreflow.sd.latent_cache import item_generator

    noise = torch.randn(1, 4, 8, 8, generator=item_generator(1, 1))
    denoiser = Denoiser(unet_network(teacher.unet), teacher.prediction_type, teacher.schedule)
    want = sample(denoiser, noise, TimeWindows(4), 4, teacher.encode_prompts(["a dog"]), teacher.null_cond(), 3.0)
    torch.testing.assert_close(latents, want[0], rtol=1e-5, atol=1e-5)
    recipe = {**RECIPE, "mixed_precision": "bf16", "stages": [{"windows": 2, "steps": 1, "solver_steps": 1}]}
    result = train(recipe, setup, tmp_path / "run", progress=False)  # the bf16 teacher also makes the data
    assert result.stages[0].steps == 1 and torch.isfinite(torch.tensor(result.history)).all()


def test_sdxl_pipeline_with_the_scheduler_samples_like_proreflow(sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    teacher = load_teacher(sdxl_dir)
    export_pipeline(teacher.unet, teacher, tmp_path / "export", num_windows=2)
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "export")
    pipe.scheduler = ProReflowScheduler.from_config(pipe.scheduler.config, num_windows=2)  # the opt-in
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    latents = pipe("a cat", num_inference_steps=3, guidance_scale=2.0, latents=noise, output_type="latent").images
    denoiser = Denoiser(unet_network(teacher.unet), teacher.prediction_type, teacher.schedule)
    want = sample(denoiser, noise, TimeWindows(2), 3, teacher.encode_prompts(["a cat"]), teacher.null_cond(), 2.0)
    torch.testing.assert_close(latents, want, rtol=1e-5, atol=1e-5)
    assert pipe("a dog", num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)


def test_bf16_with_gradient_checkpointing(sd15_dir, image_dir, tmp_path):
    setup = build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), device="cpu")
    recipe = {**RECIPE, "mixed_precision": "bf16", "gradient_checkpointing": True,
              "stages": [{"windows": 2, "steps": 1, "solver_steps": 1}]}
    result = train(recipe, setup, tmp_path / "run", progress=False)
    assert result.module.is_gradient_checkpointing  # the recipe key reached the student UNet
    assert setup.teacher_model.dtype == torch.bfloat16  # the frozen teacher runs in the training dtype
    assert torch.isfinite(torch.tensor(result.history)).all()


def test_gradient_checkpointing_gives_the_same_update(sd15_dir, image_dir):
    """Recomputing the UNet's activations in the backward pass changes memory, not the step: two optimiser
    steps with and without gradient_checkpointing give the same weights (float32, up to rounding)."""
    from proreflow.training import StageRunner

    recipe = {**RECIPE, "stages": [{"windows": 2, "steps": 2, "solver_steps": 1}]}
    weights = []
    for checkpointing in (False, True):
        setup = build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), device="cpu")
        with StageRunner({**recipe, "gradient_checkpointing": checkpointing}, setup) as runner:
            runner.run(2)
            assert runner.module.is_gradient_checkpointing == checkpointing
            weights.append({k: v.clone() for k, v in runner.module.state_dict().items()})
    moved = max(float((weights[0][k] - v).abs().max()) for k, v in load_teacher(sd15_dir).unet.state_dict().items())
    assert moved > 1e-4  # the steps changed the weights, so the comparison below means something
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_teacher_and_student_train_and_match_eager(sd15_dir, image_dir, tmp_path):
    setup = build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), device="cpu", compile=True)
    x, cond = torch.randn(2, 4, 8, 8), {"encoder_hidden_states": torch.randn(2, 16, 32)}
    eager = load_teacher(sd15_dir).unet
    with torch.no_grad():
        torch.testing.assert_close(setup.teacher_model(x, 500.0, **cond).sample, eager(x, 500.0, **cond).sample,
                                   rtol=1e-4, atol=1e-4)
    recipe = {**RECIPE, "stages": [{"windows": 2, "steps": 1, "solver_steps": 1}]}
    assert torch.isfinite(torch.tensor(train(recipe, setup, tmp_path / "run", progress=False).history)).all()


def test_validation_grids_show_the_prompts_decoded_by_the_vae(sd15_dir, image_dir, tmp_path):
    """validation_prompts: the stage-end grid is the saved student sampled for the encoded prompts from the
    fixed noise, decoded by the VAE (its pixels, round((x + 1) 127.5), in the first cell)."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from proreflow.training import load_student
    from proreflow.training.validation import to_uint8, validation_noise

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n")
    setup = build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), device="cpu", validation_prompts=str(prompts))
    recipe = {**RECIPE, "validation_every": 1, "stages": [{"windows": 2, "steps": 1, "solver_steps": 1}]}
    out = tmp_path / "run"
    train(recipe, setup, out, progress=False)
    teacher = load_teacher(sd15_dir)
    student, _ = load_student(out, setup)
    cond = teacher.encode_prompts(["a red cube", "a blue ball"])
    latents = sample(student, validation_noise(0, (2, *teacher.latent_shape(setup.info["resolution"]))),
                     TimeWindows(2), 2, cond)  # guidance 1: baked
    saved = load_file(str(out / "validation/stage-1-2w/step-00000001.safetensors"))["samples"]
    torch.testing.assert_close(saved, latents, rtol=1e-5, atol=1e-5)
    grid = np.asarray(Image.open(out / "validation/stage-1-2w/step-00000001.png"))
    first = to_uint8(teacher.decode_latents(saved[:1]))[0].permute(1, 2, 0).numpy()
    h, w = first.shape[:2]
    scale = max(1, -(-96 // max(h, w)))
    assert np.array_equal(grid[4: 4 + h * scale: scale, 4: 4 + w * scale: scale], first)
