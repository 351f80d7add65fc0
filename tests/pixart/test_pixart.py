"""PixArt teachers (a DiT on the VP path): conditions, the setup, full and LoRA training with exact resume,
and a stock-diffusers export that samples like ``proreflow.sample``.

The true answer: a student equal to the teacher stepped once per window (``proreflow.sample`` with
``TimeWindows(k)``, k steps) is the teacher's trailing DDIM at k steps, which is what the exported
pipeline's own sampling does in a fresh interpreter without proreflow; they agree to float rounding.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from sd.test_sd_export import fresh_sample, max_diff

from proreflow import Denoiser, TimeWindows, sample
from proreflow.commands.named_setups import get_setup_builder
from proreflow.pixart.export import export_pixart_pipeline, load_run_student, read_export_info
from proreflow.pixart.pipeline import load_pixart_teacher, transformer_network
from proreflow.pixart.setup import build_pixart_setup
from proreflow.sd.lora import AdaptersDisabled
from proreflow.training import train

PROMPTS = ["a cat", "two dogs on a mat"]
GUIDANCE = 2.0
CALL = {"height": 16, "width": 16, "use_resolution_binning": False, "clean_caption": False}
RECIPE = {"name": "tiny", "checkpoint_every": 1, "keep_checkpoints": 0, "log_every": 1,
          "stages": [{"windows": 2, "steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "solver_steps": 2,
                      "guidance": GUIDANCE, "ema_decay": 0.5}]}


def teacher_denoiser(pixart, model=None) -> Denoiser:
    return Denoiser(transformer_network(model or pixart.transformer), pixart.prediction_type, pixart.schedule)


def test_conditions_are_the_pipelines(alpha_dir, sigma_dir):
    alpha = load_pixart_teacher(alpha_dir, device="cpu")
    assert (alpha.prediction_type, alpha.max_sequence_length, alpha.resolution) == ("epsilon", 120, 256)
    cond = alpha.encode_prompts(PROMPTS, 16)
    states, mask, neg, neg_mask = alpha.pipe.encode_prompt(PROMPTS, device="cpu", clean_caption=False)
    torch.testing.assert_close(cond["encoder_hidden_states"], states, rtol=1e-5, atol=1e-6)
    assert torch.equal(cond["encoder_attention_mask"], mask) and mask.shape == (2, 120)
    assert mask.sum(1).tolist() == [3, 6]  # the words and T5's </s>
    # PixArt-alpha 1024's size conditions: what the pipeline passes for a 16 x 16 image
    assert torch.equal(cond["added_cond_kwargs"]["resolution"], torch.tensor([[16.0, 16.0]] * 2))
    assert torch.equal(cond["added_cond_kwargs"]["aspect_ratio"], torch.ones(2, 1))
    null = alpha.null_cond(16)
    torch.testing.assert_close(null["encoder_hidden_states"], neg[:1], rtol=1e-5, atol=1e-6)
    assert torch.equal(null["encoder_attention_mask"], neg_mask[:1]) and neg_mask[0].sum() == 1
    sigma = load_pixart_teacher(sigma_dir, device="cpu")
    assert (sigma.prediction_type, sigma.max_sequence_length) == ("v_prediction", 300)
    assert set(sigma.encode_prompts(["a cat"])) == {"encoder_hidden_states", "encoder_attention_mask"}


def test_network_takes_the_first_half_of_a_learned_variance_output(alpha_dir):
    alpha = load_pixart_teacher(alpha_dir, device="cpu")
    model = alpha.transformer
    assert model.config.out_channels == 2 * model.config.in_channels
    cond = alpha.encode_prompts(["a cat"], 16)
    x, tau = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([499.0])
    with torch.no_grad():
        full = model(x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=tau,
                     encoder_attention_mask=cond["encoder_attention_mask"], added_cond_kwargs=cond["added_cond_kwargs"],
                     return_dict=False)[0]
        out = transformer_network(model)(x, tau, cond)
    assert full.shape[1] == 8 and torch.equal(out, full[:, :4])


def test_released_folders_legacy_transformer_class_loads_as_pixart(alpha_dir, tmp_path):
    """PixArt-alpha's released folders name their transformer ``Transformer2DModel`` (diffusers 0.22); diffusers
    maps it to ``PixArtTransformer2DModel`` by its norm type, and the teacher is the same network."""
    import shutil

    legacy = shutil.copytree(alpha_dir, tmp_path / "legacy")
    for path, key in ((legacy / "model_index.json", "transformer"), (legacy / "transformer" / "config.json", None)):
        config = json.loads(path.read_text())
        if key:
            config[key] = ["diffusers", "Transformer2DModel"]
        else:
            config["_class_name"] = "Transformer2DModel"
        path.write_text(json.dumps(config))
    pixart = load_pixart_teacher(legacy, device="cpu")
    assert type(pixart.transformer).__name__ == "PixArtTransformer2DModel"
    reference = load_pixart_teacher(alpha_dir, device="cpu").transformer.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in pixart.transformer.state_dict().items())


def test_wrong_pipeline_names_the_setups(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="use a PixArtAlphaPipeline or PixArtSigmaPipeline.*stable-diffusion"):
        load_pixart_teacher(tmp_path)


@pytest.mark.parametrize("fixture, windows", [("alpha_dir", 2), pytest.param("sigma_dir", 4, marks=pytest.mark.slow)])
def test_exported_teacher_samples_like_proreflow_without_proreflow(request, fixture, windows, tmp_path):
    """Student = teacher: proreflow.sample at one step per window == the export's stock DDIM, in a fresh Python
    (about 10 s of imports each on 2 cores: Sigma in the slow suite; its trained LoRA export is checked in-process)."""
    pixart = load_pixart_teacher(request.getfixturevalue(fixture), device="cpu")
    folder = export_pixart_pipeline(pixart.transformer, pixart, tmp_path / "export", windows, GUIDANCE, resolution=16)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"] and index["_class_name"] == type(pixart.pipe).__name__
    assert read_export_info(folder)["resolution"] == 16
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    latents, images, scheduler = fresh_sample(tmp_path, index["_class_name"], folder, noise, windows,
                                              prompts=PROMPTS, guidance=GUIDANCE, call_kwargs=CALL)
    want = sample(teacher_denoiser(pixart), noise, TimeWindows(windows), windows, pixart.encode_prompts(PROMPTS, 16),
                  pixart.null_cond(16), GUIDANCE)
    want_images = ((pixart.decode_latents(want) + 1) / 2).permute(0, 2, 3, 1)
    scale = want.abs().max().item()
    print(f"{fixture} {windows} windows: latents {max_diff(latents, want):.2e} (scale {scale:.1f}), "
          f"images {max_diff(images, want_images):.2e}")
    assert scheduler == "DDIMScheduler"
    assert max_diff(latents, want) < 1e-5 * scale and max_diff(images, want_images) < 2e-6


def test_one_step_pipeline_returns_the_x0_prediction(alpha_dir, tmp_path):
    """At num_inference_steps=1 the PixArt pipeline returns DDIM's x0 prediction (export module doc):
    proreflow's 1-window sample is sqrt(abar_0) x0 + sqrt(1 - abar_0) eps of the same prediction."""
    from diffusers import PixArtAlphaPipeline

    pixart = load_pixart_teacher(alpha_dir, device="cpu")
    folder = export_pixart_pipeline(pixart.transformer, pixart, tmp_path / "export", 1, GUIDANCE, resolution=16)
    pipe = PixArtAlphaPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x0 = pipe(PROMPTS, num_inference_steps=1, guidance_scale=GUIDANCE, latents=noise, output_type="latent",
              **CALL).images.double()
    abar = pixart.schedule.alphas_cumprod.double()
    eps = (noise.double() - abar[-1].sqrt() * x0) / (1 - abar[-1]).sqrt()
    want = sample(teacher_denoiser(pixart), noise, TimeWindows(1), 1, pixart.encode_prompts(PROMPTS, 16),
                  pixart.null_cond(16), GUIDANCE).double()
    torch.testing.assert_close(abar[0].sqrt() * x0 + (1 - abar[0]).sqrt() * eps, want, rtol=1e-5,
                               atol=1e-5 * want.abs().max().item())
    assert max_diff(x0, want) > 1e-3  # the two ends differ


def _weights(run):
    return load_file(str(run / "student.safetensors"))


@pytest.mark.parametrize("fixture, lora_rank", [("alpha_dir", 0), ("sigma_dir", 4)])
def test_training_changes_the_weights_and_resumes_exactly(request, image_dir, tmp_path, fixture, lora_rank):
    """Two steps of a full (alpha) and a LoRA (sigma) student; a resume from step 1 ends bit-identical."""
    teacher = request.getfixturevalue(fixture)
    common = {"teacher": str(teacher), "data": str(image_dir), "resolution": 16, "device": "cpu",
              "lora_rank": lora_rank}
    assert get_setup_builder("pixart") is build_pixart_setup
    setup = build_pixart_setup(**common)
    x0, cond, skipped = setup.dataset[0]  # broken.jpg sorts first: item 0 is the next image, naming it
    assert x0.shape == (4, 8, 8) and skipped == [str(image_dir / "broken.jpg")]
    sized = fixture == "alpha_dir"
    assert ("added_cond_kwargs" in cond) == sized and cond["encoder_attention_mask"].shape == (120 if sized else 300,)
    assert setup.keep_on_dropout == (("added_cond_kwargs.resolution", "added_cond_kwargs.aspect_ratio") if sized
                                     else ())
    assert (setup.teacher_view is AdaptersDisabled) == bool(lora_rank)
    untrained = copy.deepcopy(setup.teacher_model.state_dict())  # LoRA trains the setup's transformer in place
    result = train(RECIPE, setup, tmp_path / "run", progress=False)
    assert len(result.history) == 2 and all(math.isfinite(loss) for _, loss in result.history)
    straight = _weights(tmp_path / "run")
    changed = [k for k, v in result.module.state_dict().items() if not torch.equal(v, untrained[k])]
    assert changed and all(("lora_" in k) == bool(lora_rank) for k in changed)
    if lora_rank:
        assert all("lora_" in k for k in changed) and any("attn2.to_k" in k for k in changed)  # cross-attention too

    resumed = train(RECIPE, build_pixart_setup(**common), tmp_path / "run", resume="1", progress=False)
    again = _weights(tmp_path / "run")
    assert again.keys() == straight.keys() and all(torch.equal(again[k], straight[k]) for k in straight)
    assert resumed.history[-1] == result.history[-1]

    # the trained student through the export (LoRA merged) samples like proreflow.sample
    pixart = load_pixart_teacher(teacher, device="cpu")
    student, info = load_run_student(tmp_path / "run", pixart.transformer, model="pixart")
    folder = export_pixart_pipeline(student, pixart, tmp_path / "export", info["windows"], GUIDANCE, resolution=16)
    pipe = type(pixart.pipe).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    got = pipe(PROMPTS, num_inference_steps=2, guidance_scale=GUIDANCE, latents=noise, output_type="latent",
               **CALL).images
    want = sample(teacher_denoiser(pixart, student), noise, TimeWindows(2), 2, pixart.encode_prompts(PROMPTS, 16),
                  pixart.null_cond(16), GUIDANCE)
    assert max_diff(got, want) < 1e-5 * want.abs().max().item()
    assert max_diff(want, sample(teacher_denoiser(pixart), noise, TimeWindows(2), 2,
                                 pixart.encode_prompts(PROMPTS, 16), pixart.null_cond(16), GUIDANCE)) > 1e-4


def test_latent_cache_equals_encoding_on_the_fly(alpha_dir, image_dir, tmp_path):
    common = {"teacher": str(alpha_dir), "data": str(image_dir), "resolution": 16, "device": "cpu", "seed": 3}
    cached = build_pixart_setup(cache_dir=str(tmp_path / "cache"), **common)
    live = build_pixart_setup(**common)
    assert len(cached.dataset) == len(live.dataset) - 1  # the cache leaves the corrupt image out
    for row, index in [(0, 0), (0, 1), (4, 5)]:  # cache row i holds image i + 1 (broken.jpg sorts first)
        (x_cache, c_cache), (x_live, c_live) = cached.dataset[row], live.dataset[index][:2]
        torch.testing.assert_close(x_cache, x_live, rtol=2e-3, atol=2e-3)  # float16 storage
        torch.testing.assert_close(c_cache["encoder_hidden_states"], c_live["encoder_hidden_states"],
                                   rtol=2e-3, atol=2e-3)
        assert torch.equal(c_cache["encoder_attention_mask"], c_live["encoder_attention_mask"])
        assert c_cache["added_cond_kwargs"].keys() == {"resolution", "aspect_ratio"}
        for key in ("resolution", "aspect_ratio"):  # float32: exact
            assert torch.equal(c_cache["added_cond_kwargs"][key], c_live["added_cond_kwargs"][key])


def test_validation_grids_sample_the_prompts_at_the_training_size(alpha_dir, image_dir, tmp_path):
    """validation_prompts: the saved validation samples are the student sampled for the prompts encoded with the
    size conditions of the training resolution (16 px here, not the pipeline's default 256)."""
    from proreflow.training import load_student
    from proreflow.training.validation import validation_noise

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\ntwo dogs\n")
    setup = build_pixart_setup(teacher=str(alpha_dir), data=str(image_dir), resolution=16, device="cpu",
                               validation_prompts=str(prompts))
    assert torch.equal(setup.validation.cond["added_cond_kwargs"]["resolution"], torch.full((2, 2), 16.0))
    recipe = {**RECIPE, "checkpoint_every": 0, "validation_every": 1,
              "stages": [{"windows": 2, "steps": 1, "solver_steps": 1, "batch_size": 2}]}
    train(recipe, setup, tmp_path / "run", progress=False)
    student, _ = load_student(tmp_path / "run", setup)
    pixart = load_pixart_teacher(alpha_dir, device="cpu")
    want = sample(student, validation_noise(0, (2, 4, 8, 8)), TimeWindows(2), 2,
                  pixart.encode_prompts(["a red cat", "two dogs"], 16))  # guidance 1: baked
    saved = load_file(str(tmp_path / "run/validation/stage-1-2w/step-00000001.safetensors"))["samples"]
    torch.testing.assert_close(saved, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_bf16_with_gradient_checkpointing(sigma_dir, image_dir, tmp_path):
    setup = build_pixart_setup(teacher=str(sigma_dir), data=str(image_dir), resolution=16, device="cpu")
    recipe = {**RECIPE, "checkpoint_every": 0, "mixed_precision": "bf16", "gradient_checkpointing": True,
              "stages": [{"windows": 2, "steps": 1, "solver_steps": 1, "batch_size": 2}]}
    result = train(recipe, setup, tmp_path / "run", progress=False)
    assert result.module.is_gradient_checkpointing  # the recipe key reached the student transformer
    assert setup.teacher_model.dtype == torch.bfloat16  # the frozen teacher runs in the training dtype
    assert torch.isfinite(torch.tensor(result.history)).all()
