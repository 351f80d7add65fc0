"""ProReflowScheduler: its loop is proreflow.sampling, it saves and reloads, it fits pipelines."""

from __future__ import annotations

import pytest
import torch

from proreflow import Denoiser, TimeWindows, sample
from proreflow.conditioning import cat_cond, expand_cond, map_cond
from proreflow.sd import ProReflowScheduler
from proreflow.sd.pipeline import load_teacher, unet_network


def scheduler_loop(unet, scheduler, noise, steps, cond, uncond, guidance):
    """The denoising loop of StableDiffusion(XL)Pipeline, written out: CFG batch [uncond, cond]."""
    scheduler.set_timesteps(steps)
    both = cat_cond(expand_cond(uncond, noise.shape[0]), cond)
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([x, x]), t)
            out = unet(inp, t, **both, return_dict=False)[0]
            out_u, out_c = out.chunk(2)
            x = scheduler.step(out_u + guidance * (out_c - out_u), t, x).prev_sample
    return x


@pytest.mark.parametrize("fixture, dtype", [("sd15_dir", torch.float64), ("sd2v_dir", torch.float64),
                                            ("sdxl_dir", torch.float64), ("sd15_dir", torch.float32)])
def test_full_loop_equals_sampling(request, fixture, dtype):
    teacher = load_teacher(request.getfixturevalue(fixture), local_files_only=True)
    unet = teacher.unet.to(dtype)
    cond, uncond = (map_cond(lambda a: a.to(dtype), c) for c in (teacher.encode_prompts(["a cat", "a dog"]),
                                                                   teacher.null_cond()))
    noise = torch.randn(2, *teacher.latent_shape(16), generator=torch.Generator().manual_seed(0), dtype=dtype)
    denoiser = Denoiser(unet_network(unet), teacher.prediction_type, teacher.schedule)
    for windows, steps in [(2, 2), (2, 5)]:  # one step per window; uneven (3 + 2) steps
        scheduler = ProReflowScheduler.from_config(teacher.scheduler_config, num_windows=windows)
        got = scheduler_loop(unet, scheduler, noise, steps, cond, uncond, guidance=3.0)
        want = sample(denoiser, noise, TimeWindows(windows), steps, cond, uncond, guidance=3.0)
        assert got.dtype == dtype
        # float64: equal to 1e-6. float32: sampling.py computes its step times in float32 arithmetic, the
        # scheduler takes TimeWindows.time_grid (float64): a time may differ by one float32 ulp.
        scale = 1e-6 if dtype == torch.float64 else 1e-5 * want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=0, atol=scale)


def test_timesteps_are_the_window_grid(sd15_dir):
    scheduler = ProReflowScheduler.from_config(load_teacher(sd15_dir).scheduler_config, num_windows=4)
    scheduler.set_timesteps(6)
    grid = TimeWindows(4).time_grid(6)
    assert scheduler.timesteps.tolist() == pytest.approx([t * 999 for t, _, _ in grid], abs=1e-4)
    assert scheduler.timesteps[0].item() == 999.0 and scheduler.init_noise_sigma == 1.0
    with pytest.raises(ValueError, match="cannot cover 4 windows"):
        scheduler.set_timesteps(3)
    with pytest.raises(ValueError, match="not on the grid"):
        scheduler.step(torch.zeros(1, 4, 2, 2), 500.0, torch.zeros(1, 4, 2, 2))


def test_schedule_from_teacher_config(sd2v_dir):
    teacher = load_teacher(sd2v_dir)
    scheduler = ProReflowScheduler.from_config(teacher.scheduler_config, num_windows=2)
    assert scheduler.config.prediction_type == "v_prediction"
    torch.testing.assert_close(scheduler.schedule.alphas_cumprod.float(),
                               teacher.pipe.scheduler.alphas_cumprod.float(), rtol=1e-6, atol=1e-7)


def test_save_and_reload(tmp_path):
    scheduler = ProReflowScheduler(num_windows=2, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    scheduler.save_pretrained(tmp_path)
    again = ProReflowScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.config) == public(scheduler.config)
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for s in (scheduler, again):
        s.set_timesteps(3)
    assert torch.equal(scheduler.timesteps, again.timesteps)
    for t in scheduler.timesteps:
        assert torch.equal(scheduler.step(out, t, x).prev_sample, again.step(out, t, x).prev_sample)


def test_step_keeps_the_sample_dtype():
    scheduler = ProReflowScheduler(num_windows=1)
    scheduler.set_timesteps(2)
    x = torch.randn(1, 4, 4, 4, dtype=torch.bfloat16)
    assert scheduler.step(x, scheduler.timesteps[0], x).prev_sample.dtype == torch.bfloat16


def test_add_noise_is_forward_noising():
    scheduler = ProReflowScheduler(num_windows=1)
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    abar = scheduler.schedule.alphas_cumprod[500].float()
    torch.testing.assert_close(scheduler.add_noise(x0, eps, torch.tensor([500, 500])),
                               abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
