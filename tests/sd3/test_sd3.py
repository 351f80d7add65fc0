"""SD3-class teachers: loading without T5, conditions, the setup, training; the stock pipeline at the window
sigmas (exports: test_sd3_export.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from proreflow import Denoiser, FlowSchedule, TimeWindows, sample
from proreflow.commands.named_setups import get_setup_builder
from proreflow.sd3.export import window_sigmas
from proreflow.sd3.pipeline import load_sd3_teacher, transformer_network
from proreflow.sd3.setup import build_sd3_setup
from proreflow.training import train

RECIPE = {"name": "tiny", "checkpoint_every": 0, "log_every": 1,
          "defaults": {"batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "guidance": 2.0, "ema_decay": 0.5},
          "stages": [{"windows": 2, "steps": 2, "solver_steps": 2}, {"windows": 1, "steps": 2, "teacher": "previous"}]}


def _perturbed(model, seed: int = 0):
    """A copy of ``model`` with every weight moved: a student that is not its teacher."""
    g = torch.Generator().manual_seed(seed)
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return student


def test_conditions_are_the_pipelines_and_the_null_condition_its_negative(sd3_dir):
    sd3 = load_sd3_teacher(sd3_dir, device="cpu")
    assert sd3.pipe.text_encoder_3 is None and sd3.resolution == 16
    cond = sd3.encode_prompts(["a cat", "a dog"])
    pos, neg, pooled, neg_pooled = sd3.pipe.encode_prompt("a cat", None, None, device="cpu",
                                                          do_classifier_free_guidance=True)
    torch.testing.assert_close(cond["encoder_hidden_states"][:1], pos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond["pooled_projections"][:1], pooled, rtol=1e-5, atol=1e-6)
    null = sd3.null_cond()
    torch.testing.assert_close(null["encoder_hidden_states"], neg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(null["pooled_projections"], neg_pooled, rtol=1e-5, atol=1e-6)
    # without T5 the pipeline's sequence ends with zero tokens in the T5 slots
    states = cond["encoder_hidden_states"]
    assert states[:, 16:].abs().max() == 0 and states[:, :16].abs().max() > 0
    schedule = sd3.schedule()
    assert (schedule.shift, schedule.window_space) == (3.0, "sigma")


def test_latents_use_the_sd3_vae_shift_and_scale(sd3_dir):
    sd3 = load_sd3_teacher(sd3_dir, device="cpu")
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    z = sd3.vae.encode(pixels).latent_dist.mode()
    latents = (z - 0.0609) * 1.5305
    decoded = sd3.vae.decode(latents / 1.5305 + 0.0609).sample.clamp(-1, 1)
    torch.testing.assert_close(sd3.decode_latents(latents), decoded, rtol=1e-6, atol=1e-6)
    draws = [sd3.vae.encode(pixels[i:i + 1]).latent_dist.sample(generator=torch.Generator().manual_seed(i))
             for i in range(2)]  # item i: its own generator
    want = (torch.cat(draws) - 0.0609) * 1.5305
    got = sd3.encode_images(pixels, [torch.Generator().manual_seed(i) for i in range(2)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window_space", ["sigma", "unshifted"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_stock_pipeline_at_window_sigmas_samples_like_proreflow(sd3_dir, window_space, guidance):
    """diffusers' own Euler loop at the window-edge sigmas == proreflow.sample stepped once per window."""
    sd3 = load_sd3_teacher(sd3_dir, window_space=window_space, device="cpu")
    model = _perturbed(sd3.transformer)
    student = Denoiser(transformer_network(model), "flow_velocity", sd3.schedule())
    pipe = sd3.pipe
    pipe.transformer = model
    cond, null = sd3.encode_prompts(["a cat", "a dog"]), sd3.null_cond()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for windows in (TimeWindows(1), TimeWindows(4)):
        want = sample(student, noise, windows, windows.count, cond, null, guidance)
        got = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
                   negative_prompt_embeds=null["encoder_hidden_states"].expand(2, -1, -1),
                   negative_pooled_prompt_embeds=null["pooled_projections"].expand(2, -1),
                   sigmas=window_sigmas(sd3.schedule(), windows), guidance_scale=guidance, latents=noise,
                   output_type="latent").images
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_setup_is_registered_and_trains_two_stages(sd3_dir, image_dir, tmp_path):
    assert get_setup_builder("stable-diffusion-3") is build_sd3_setup
    setup = build_sd3_setup(teacher=str(sd3_dir), data=str(image_dir), device="cpu", window_space="unshifted")
    assert setup.prediction_type == "flow_velocity" and setup.schedule.shift == 3.0
    x0, cond, skipped = setup.dataset[0]  # broken.jpg sorts first: item 0 is the next image, naming it
    assert x0.shape == (4, 8, 8) and set(cond) == {"encoder_hidden_states", "pooled_projections"}
    assert skipped == [str(image_dir / "broken.jpg")] and len(setup.dataset[1]) == 2
    result = train(RECIPE, setup, tmp_path / "run", progress=False)
    assert result.windows == TimeWindows(1) and len(result.history) == 4
    assert all(math.isfinite(loss) for _, loss in result.history)
    assert result.student.prediction_type == "flow_velocity" and result.student.schedule == setup.schedule
    teacher_weights = setup.teacher_model.state_dict()
    assert any(not torch.equal(v, teacher_weights[k]) for k, v in result.module.state_dict().items())
    assert "unshifted" in (tmp_path / "run" / "student.json").read_text()


def test_latent_cache_equals_encoding_on_the_fly(sd3_dir, image_dir, tmp_path):
    common = {"teacher": str(sd3_dir), "data": str(image_dir), "device": "cpu", "seed": 3}
    cached = build_sd3_setup(cache_dir=str(tmp_path / "cache"), **common)
    live = build_sd3_setup(**common)
    assert len(cached.dataset) == len(live.dataset) - 1  # the cache leaves the corrupt image out
    # the folder sorts broken.jpg first: cache row i holds image i + 1; live item 0 is image 1's stand-in
    for row, index in [(0, 0), (0, 1), (4, 5)]:
        (x_cache, c_cache), (x_live, c_live) = cached.dataset[row], live.dataset[index][:2]
        torch.testing.assert_close(x_cache, x_live, rtol=2e-3, atol=2e-3)  # float16 storage
        for key in ("encoder_hidden_states", "pooled_projections"):
            torch.testing.assert_close(c_cache[key], c_live[key], rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="resolution: cache 16, now 32"):
        build_sd3_setup(cache_dir=str(tmp_path / "cache"), resolution=32, **common)



def test_the_sd3_latent_cache_is_keyed_on_its_files_and_encoders_like_every_family(sd3_dir, image_dir, tmp_path,
                                                                                    caplog):
    """The SD3 cache records the files and encoders it was made from (the latent families share one keying,
    sd.setup.encoded_dataset): another encoder dtype rebuilds it, saying why."""
    import json
    import logging

    common = {"teacher": str(sd3_dir), "data": str(image_dir), "device": "cpu", "cache_dir": str(tmp_path / "c")}
    build_sd3_setup(**common)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())["settings"]
    assert manifest["encoder_dtype"] == "torch.float32" and "files" in manifest
    assert manifest["encoder"] == "CLIPTextModelWithProjection+CLIPTextModelWithProjection+AutoencoderKL"
    with caplog.at_level(logging.WARNING):
        build_sd3_setup(**common, encoder_dtype="bf16")
    assert any("is stale (encoder_dtype" in r.message and "rebuilding" in r.message for r in caplog.records)


def test_dynamic_shifting_uses_the_pipelines_mu(sd3_dynamic_dir):
    """The pipeline computes mu from the latent size itself; the teacher's schedule must use the same."""
    sd3 = load_sd3_teacher(sd3_dynamic_dir, window_space="unshifted", device="cpu")
    mu = sd3.mu(16)
    assert mu is not None and sd3.schedule(16).shift == pytest.approx(math.exp(mu))
    sd3.pipe.transformer = _perturbed(sd3.transformer, seed=2)
    student = Denoiser(transformer_network(sd3.pipe.transformer), "flow_velocity", sd3.schedule(16))
    cond = sd3.encode_prompts(["a cat"])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    windows = TimeWindows(3)
    got = sd3.pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
                   sigmas=window_sigmas(sd3.schedule(16), windows), guidance_scale=1.0, latents=noise,
                   output_type="latent").images
    torch.testing.assert_close(got, sample(student, noise, windows, 3, cond), rtol=1e-5, atol=1e-5)
    static = Denoiser(student.network, "flow_velocity", FlowSchedule(1.0, "unshifted"))  # mu ignored: differs
    assert (sample(static, noise, windows, 3, cond) - got).abs().max() > 1e-3
