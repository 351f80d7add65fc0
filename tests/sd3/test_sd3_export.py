"""SD3 exports load with diffusers alone and sample like ``proreflow.sample``: the full pipeline and LoRA.

A fresh interpreter without proreflow (tests/sd/fresh_diffusers.py) loads the folder (or the base
pipeline + ``load_lora_weights``), samples the prompts at the ``sigmas`` of ``proreflow.json`` with
guidance, and must give ``proreflow.sample(student, noise, TimeWindows(k), k, cond, null, g)`` (and its
VAE-decoded images) to float rounding.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from sd.test_sd_export import GUIDANCE, PROMPTS, fresh_sample, max_diff

from proreflow import Denoiser, TimeWindows, sample
from proreflow.sd.export import model_card
from proreflow.sd.lora import add_lora
from proreflow.sd3.export import TAG, export_sd3_lora, export_sd3_pipeline, read_export_info, usage, window_sigmas
from proreflow.sd3.pipeline import load_sd3_teacher, transformer_network

LATENT_TOL, IMAGE_TOL = 5e-6, 3e-6  # measured up to 4.8e-7 and 7.8e-7 (docs/flow-matching.md)
NO_T5 = ("text_encoder_3", "tokenizer_3")  # the tiny pipeline has none: load it as diffusers documents


def perturbed(model, seed: int = 0, scale: float = 0.05):
    """A copy of ``model`` with every weight moved: a student that is not its teacher."""
    g = torch.Generator().manual_seed(seed)
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return student


def lora_student(transformer, seed: int = 1):
    """The transformer with rank-4 LoRA layers (alpha 8, scale 2) and random B: a LoRA student."""
    student = add_lora(copy.deepcopy(transformer), rank=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return student


def proreflow_sample(teacher, model, noise: torch.Tensor, windows: int, steps: int | None = None):
    """``proreflow.sample`` of ``model`` with guidance, and its images as the pipeline returns them (N x H x W x C)."""
    denoiser = Denoiser(transformer_network(model), "flow_velocity", teacher.schedule())
    latents = sample(denoiser, noise, TimeWindows(windows), steps or windows, teacher.encode_prompts(PROMPTS),
                     teacher.null_cond(), GUIDANCE)
    return latents, ((teacher.decode_latents(latents) + 1) / 2).permute(0, 2, 3, 1)


def noise_for(teacher) -> torch.Tensor:
    return torch.randn(len(PROMPTS), *teacher.latent_shape(16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("window_space, windows", [("sigma", 2), pytest.param("unshifted", 3, marks=pytest.mark.slow)])
def test_exported_pipeline_samples_like_proreflow_without_proreflow(sd3_dir, tmp_path, window_space, windows):
    teacher = load_sd3_teacher(sd3_dir, window_space=window_space)
    student = perturbed(teacher.transformer)
    folder = export_sd3_pipeline(student, teacher, tmp_path / "export", windows, guidance=GUIDANCE)
    info = read_export_info(folder)
    assert info["sigmas"] == window_sigmas(teacher.schedule(), TimeWindows(windows))
    assert (info["window_space"], info["guidance"], info["use_t5"]) == (window_space, GUIDANCE, False)
    saved = load_file(str(folder / "transformer/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in student.state_dict().items())
    noise = noise_for(teacher)
    latents, images, scheduler = fresh_sample(tmp_path, "StableDiffusion3Pipeline", folder, noise, windows,
                                              sigmas=info["sigmas"], without=NO_T5)
    want_latents, want_images = proreflow_sample(teacher, student, noise, windows)
    print(f"SD3 {window_space} {windows} windows: latents {max_diff(latents, want_latents):.2e} "
          f"(scale {want_latents.abs().max():.1f}), images {max_diff(images, want_images):.2e}")
    assert scheduler == "FlowMatchEulerDiscreteScheduler"
    assert max_diff(latents, want_latents) < LATENT_TOL and max_diff(images, want_images) < IMAGE_TOL


def test_more_steps_than_windows_are_the_stock_sampler_in_sigma_space_only(sd3_dir):
    """Windows uniform in sigma: any step count is the stock Euler at window_sigmas(..., steps); in the
    unshifted s that holds at one step per window only, so more steps are refused."""
    teacher = load_sd3_teacher(sd3_dir)
    student = perturbed(teacher.transformer, seed=3)
    pipe = copy.copy(teacher.pipe)
    pipe.register_modules(transformer=student)
    noise = noise_for(teacher)
    got = pipe(PROMPTS, sigmas=window_sigmas(teacher.schedule(), TimeWindows(2), 5), guidance_scale=GUIDANCE,
               latents=noise, output_type="latent").images
    want, _ = proreflow_sample(teacher, student, noise, 2, steps=5)
    assert max_diff(got, want) < LATENT_TOL
    unshifted = load_sd3_teacher(sd3_dir, window_space="unshifted").schedule()
    with pytest.raises(ValueError, match="only at one step per window; use 2 steps"):
        window_sigmas(unshifted, TimeWindows(2), 4)


@pytest.fixture(scope="module")
def lora_export(sd3_dir, tmp_path_factory):
    teacher = load_sd3_teacher(sd3_dir)
    student = lora_student(teacher.transformer)
    out = tmp_path_factory.mktemp("sd3lora") / "export"
    path, kept = export_sd3_lora(student, teacher, out, num_windows=2, guidance=GUIDANCE,
                                 extra={"repo_id": "me/tiny-sd3"})
    return teacher, student, out, path, kept


@pytest.mark.slow  # a fresh interpreter with peft: ~20 s on 2 shared cores; in-process: test_lora_extracted_...
def test_lora_loads_on_the_base_without_proreflow_and_samples_like_proreflow(lora_export, sd3_dir, tmp_path):
    teacher, student, out, path, kept = lora_export
    assert path == out / "pytorch_lora_weights.safetensors" and kept == 1.0
    assert all(key.startswith("transformer.") for key in load_file(str(path)))
    info = read_export_info(out)
    assert info["base"] == str(sd3_dir) and info["sigmas"] == window_sigmas(teacher.schedule(), TimeWindows(2))
    noise = noise_for(teacher)
    latents, images, _ = fresh_sample(tmp_path, "StableDiffusion3Pipeline", sd3_dir, noise, 2, out,
                                      sigmas=info["sigmas"], without=NO_T5)
    want_latents, want_images = proreflow_sample(teacher, student, noise, 2)
    print(f"SD3 LoRA: latents {max_diff(latents, want_latents):.2e}, images {max_diff(images, want_images):.2e}")
    assert max_diff(latents, want_latents) < LATENT_TOL and max_diff(images, want_images) < IMAGE_TOL
    base, _ = proreflow_sample(teacher, teacher.transformer, noise, 2)
    assert max_diff(base, want_latents) > 100 * LATENT_TOL  # the LoRA changes the samples


def test_model_cards_give_the_loading_and_sigmas_lines(lora_export, sd3_dir, tmp_path):
    teacher, _, out, _, _ = lora_export
    info = read_export_info(out)
    card = (out / "README.md").read_text()
    assert card == model_card(info, None, usage(info), TAG)
    sigmas = window_sigmas(teacher.schedule(), TimeWindows(2))
    assert f'image = pipe("a photo of a cat", sigmas={sigmas}, guidance_scale=2).images[0]' in card
    assert (f'pipe = StableDiffusion3Pipeline.from_pretrained("{sd3_dir}", text_encoder_3=None, tokenizer_3=None, '
            'dtype=torch.float16).to("cuda")\npipe.load_lora_weights("me/tiny-sd3")') in card
    assert "- stable-diffusion-3\n- lora\n" in card and "DDIM" not in card
    metrics = [{"name": "teacher Euler-32", "steps": 32, "fid": 25.5},
               {"name": "student 2-step", "steps": 2, "fid": 27.25, "psnr_to_teacher": 21.5}]
    export_sd3_pipeline(teacher.transformer, teacher, tmp_path / "full", 2, extra={"recipe": "tiny"},
                        dtype=torch.bfloat16, metrics=metrics)
    full = (tmp_path / "full/README.md").read_text()
    assert 'from_pretrained("THIS_FOLDER", text_encoder_3=None' in full and "load_lora_weights" not in full
    assert "| student 2-step | 2 | 27.25 | – | – | – | 21.50 | – |" in full and "| weights dtype | bfloat16 |" in full
    saved = load_file(str(tmp_path / "full/transformer/diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    assert teacher.transformer.dtype == torch.float32  # the teacher itself is left as it was


def test_lora_extracted_from_a_full_student_is_its_low_rank_change(sd3_dir, tmp_path):
    """A full student whose weight change has rank 2: rank-4 extraction keeps all of it, and the base
    pipeline with the LoRA has the student's transformer."""
    from diffusers import StableDiffusion3Pipeline

    teacher = load_sd3_teacher(sd3_dir)
    student = copy.deepcopy(teacher.transformer)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in (student.transformer_blocks[0].attn.to_q, student.proj_out):
            w = layer.weight
            w += 0.1 * torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
    _, kept = export_sd3_lora(student, teacher, tmp_path / "lora", num_windows=2, rank=4)
    assert kept == pytest.approx(1.0, abs=1e-6)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, **dict.fromkeys(NO_T5))
    pipe.load_lora_weights(tmp_path / "lora")
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300.0])
    cond = teacher.encode_prompts(["a cat"])
    with torch.no_grad():
        want = student(hidden_states=x, timestep=t, **cond).sample
        torch.testing.assert_close(pipe.transformer(hidden_states=x, timestep=t, **cond).sample, want,
                                   rtol=1e-5, atol=1e-5)
        assert max_diff(want, teacher.transformer(hidden_states=x, timestep=t, **cond).sample) > 1e-3
    assert json.loads((tmp_path / "lora/proreflow.json").read_text())["lora_kept_fraction"] == kept


def test_docs_show_the_tested_lines():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs/flow-matching.md").read_text()
    assert 'pipe("a photo of a cat", sigmas=info["sigmas"], guidance_scale=info["guidance"])' in text
    assert 'pipe.load_lora_weights("exports/sd3-lora")' in text and "Not done yet: the `proreflow export`" not in text
    for command in ("proreflow export --run runs/sd3", "proreflow sample --model exports/sd3",
                    "proreflow eval --teacher"):
        assert command in text


def test_a_lora_student_exports_as_merged_weights(lora_export, tmp_path):
    """The full export of a LoRA student is a plain transformer computing the student (W + (alpha / r) B A)."""
    from diffusers import SD3Transformer2DModel

    teacher, student, _, _, _ = lora_export
    export_sd3_pipeline(student, teacher, tmp_path / "merged", num_windows=2)
    merged = SD3Transformer2DModel.from_pretrained(tmp_path / "merged/transformer")
    assert not any("lora" in key for key in merged.state_dict()) and student.peft_config  # the student kept its LoRA
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([700.0, 200.0])
    cond = teacher.encode_prompts(PROMPTS)
    with torch.no_grad():
        want = student(hidden_states=x, timestep=t, **cond).sample
        torch.testing.assert_close(merged(hidden_states=x, timestep=t, **cond).sample, want, rtol=1e-5, atol=1e-5)
        assert max_diff(want, teacher.transformer(hidden_states=x, timestep=t, **cond).sample) > 1e-3
