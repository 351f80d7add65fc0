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
    assert scheduler.timesteps.tolist() == pytest.approx([max(t * 1000 - 1, 0) for t, _, _ in grid], abs=1e-4)
    assert scheduler.timesteps[0].item() == 999.0 and scheduler.init_noise_sigma == 1.0
    scheduler.set_timesteps(3)  # fewer steps than windows: each step spans windows, DDIM-3's grid
    assert scheduler.timesteps.tolist() == pytest.approx([999.0, 1000 * 2 / 3 - 1, 1000 / 3 - 1], abs=1e-4)
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


# --- diffusers' scheduler conventions (in the spirit of diffusers' common scheduler tests) ----------

SOURCES = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler")
SCHEDULES = {  # name -> source config kwargs; "defaults" passes no betas at all
    "defaults": {},
    "linear": {"beta_schedule": "linear", "beta_start": 0.0002, "beta_end": 0.03},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "scaled_linear_start_only": {"beta_schedule": "scaled_linear", "beta_start": 0.00085},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
    "zero_snr_v": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                   "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    "trained_betas": {"trained_betas": torch.linspace(1e-4, 0.03, 1000).tolist()},
}


@pytest.mark.parametrize("source, schedule", [(source, schedule) for source in SOURCES for schedule in SCHEDULES
                                              if (source, schedule) != ("PNDMScheduler", "zero_snr_v")])
def test_from_config_keeps_the_source_schedule(source, schedule):
    """``from_config`` of another scheduler's config (PNDM has no zero-SNR option) keeps its alphas_cumprod
    (float64 against its float32 table: 1e-6, diffusers' float32 rounding; Euler's zero-SNR table ends
    at 2**-24 where ours is 0)."""
    import diffusers

    src = getattr(diffusers, source)(**SCHEDULES[schedule])
    ours = ProReflowScheduler.from_config(src.config, num_windows=2)
    torch.testing.assert_close(ours.schedule.alphas_cumprod, src.alphas_cumprod.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.alphas_cumprod, src.alphas_cumprod, rtol=0, atol=1e-6)
    # betas near a zero-SNR end are ratios of abar ~ 1e-5 that diffusers rounds in float32: 2e-5 relative
    torch.testing.assert_close(ours.betas, src.betas, rtol=1e-4, atol=1e-6)
    assert ours.config.prediction_type == src.config.prediction_type
    back = getattr(diffusers, source).from_config(ours.config)  # and back again
    torch.testing.assert_close(back.alphas_cumprod, src.alphas_cumprod, rtol=0, atol=1e-6)


def test_a_saved_config_without_betas_converts_to_diffusers_defaults(tmp_path):
    """A scheduler_config.json that omits beta_start / beta_end: diffusers fills in its defaults, and
    from_config drops them (``_use_default_values``), so ours must be diffusers' defaults too."""
    import json

    from diffusers import PNDMScheduler

    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "PNDMScheduler",
                                                                 "beta_schedule": "scaled_linear"}))
    src = PNDMScheduler.from_pretrained(tmp_path)
    assert {"beta_start", "beta_end"} <= set(src.config["_use_default_values"])
    ours = ProReflowScheduler.from_config(src.config, num_windows=2)
    assert (ours.config.beta_start, ours.config.beta_end) == (0.0001, 0.02)
    torch.testing.assert_close(ours.schedule.alphas_cumprod, src.alphas_cumprod.double(), rtol=0, atol=1e-6)


def test_defaults_and_attributes_are_diffusers():
    from diffusers import DDPMScheduler

    ours, theirs = ProReflowScheduler(), DDPMScheduler()
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                "rescale_betas_zero_snr"):
        assert ours.config[key] == theirs.config[key], key
    assert ours.order == 1 and ours.init_noise_sigma == 1.0
    assert {"DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "EulerDiscreteScheduler"} <= {
        c.__name__ for c in ours.compatibles}
    assert ours.alphas_cumprod.dtype == ours.betas.dtype == torch.float32
    torch.testing.assert_close(torch.cumprod(ours.alphas.double(), 0), ours.alphas_cumprod.double(), rtol=1e-6,
                               atol=0)
    x = torch.randn(2, 4, 3, 3)
    ours.set_timesteps(4)
    assert torch.equal(ours.scale_model_input(x, ours.timesteps[0]), x)


def test_step_output_shapes_and_tuple():
    scheduler = ProReflowScheduler(num_windows=2)
    scheduler.set_timesteps(3)
    for shape in [(1, 4, 8, 8), (3, 4, 2, 5)]:
        x, out = torch.randn(shape), torch.randn(shape)
        result = scheduler.step(out, scheduler.timesteps[1], x)
        (as_tuple,) = scheduler.step(out, scheduler.timesteps[1], x, return_dict=False)
        assert result.prev_sample.shape == shape and torch.equal(result.prev_sample, as_tuple)


def hand_written_loop(windows: int, steps: int, model, x):
    """The piecewise-straight Euler loop written out in float64 from the equations (no proreflow code):
    SD's scaled-linear table; grid: ``steps`` spread evenly over ``windows`` equal windows of t in
    [1, 0]; at t the network sees the timestep ``max(t * T - 1, 0)`` (a float32 value, as pipelines
    pass it), abar linear in it; eps -> x0 -> DDIM landing at the window end ``s``; Euler step
    ``x + (t_next - t) (x_s - x) / (s - t)``."""
    T = 1000
    table = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2, 0)

    def abar(t):
        tau = max(t * T - 1, 0)
        lo = min(int(tau), T - 2)
        return table[lo] + (tau - lo) * (table[lo + 1] - table[lo])

    per_window = [steps // windows + (1 if i < steps % windows else 0) for i in range(windows)]
    for w, n in enumerate(per_window):
        start, end = 1 - w / windows, 1 - (w + 1) / windows
        for j in range(n):
            t, t_next = start + (end - start) * j / n, start + (end - start) * (j + 1) / n
            a_t, a_s = abar(t), abar(end)
            eps = model(x, torch.tensor(max(t * T - 1, 0), dtype=torch.float32).double())
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x_s = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
            x = x + (t_next - t) * (x_s - x) / (end - t)
    return x


@pytest.mark.parametrize("windows, steps", [(1, 1), (2, 2), (4, 4), (2, 5), (4, 7)])
def test_full_loop_equals_the_hand_written_reference(windows, steps):
    scheduler = ProReflowScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   num_windows=windows)

    def model(x, timestep):  # any smooth function of (x, timestep)
        return 0.3 * x + torch.sin(torch.as_tensor(timestep, dtype=torch.float64) / 100) * 0.5

    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = noise
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.double()), t, x).prev_sample
    want = hand_written_loop(windows, steps, model, noise)
    torch.testing.assert_close(x, want, rtol=0, atol=1e-9)


def test_timesteps_are_on_the_grid_and_reach_every_window_edge():
    scheduler = ProReflowScheduler(num_windows=4)
    for steps in (4, 6, 9):
        scheduler.set_timesteps(steps, device="cpu")
        ts = scheduler.timesteps
        assert len(ts) == steps and ts[0].item() == 999.0 and bool((ts[1:] < ts[:-1]).all())
        assert ts.min().item() > 0  # the last step starts above t = 0
        edges = {round(1000 * e - 1, 4) for e in (1.0, 0.75, 0.5, 0.25)}
        assert edges <= {round(v, 4) for v in ts.tolist()}  # every window starts on the grid


def test_add_noise_equals_diffusers_at_integer_timesteps():
    from diffusers import DDPMScheduler

    theirs = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = ProReflowScheduler.from_config(theirs.config, num_windows=2)
    x0, eps = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    timesteps = torch.tensor([0, 421, 999])
    torch.testing.assert_close(ours.add_noise(x0, eps, timesteps), theirs.add_noise(x0, eps, timesteps),
                               rtol=1e-5, atol=1e-6)


def test_training_and_export_share_a_schedule_whose_json_omits_betas(sd15_dir, image_dir, tmp_path):
    """A teacher whose scheduler_config.json leaves out beta_start / beta_end trains (VPSchedule) and
    exports (DDIM, then ProReflowScheduler from it) on the schedule its own pipeline uses."""
    import json
    import shutil

    from diffusers import DDIMScheduler

    from proreflow.sd.export import export_pipeline
    from proreflow.sd.setup import build_sd_setup

    teacher_dir = tmp_path / "teacher"
    shutil.copytree(sd15_dir, teacher_dir)
    path = teacher_dir / "scheduler/scheduler_config.json"
    config = json.loads(path.read_text())
    del config["beta_start"], config["beta_end"]
    path.write_text(json.dumps(config))
    teacher = load_teacher(teacher_dir)
    pipeline_table = teacher.pipe.scheduler.alphas_cumprod.double()  # the teacher's own: 0.0001 .. 0.02, scaled
    setup = build_sd_setup(teacher=str(teacher_dir), data=str(image_dir), device="cpu")
    torch.testing.assert_close(setup.schedule.alphas_cumprod, pipeline_table, rtol=0, atol=1e-6)
    export_pipeline(teacher.unet, teacher, tmp_path / "export", num_windows=2)
    exported = DDIMScheduler.from_pretrained(tmp_path / "export/scheduler")
    torch.testing.assert_close(exported.alphas_cumprod.double(), pipeline_table, rtol=0, atol=1e-6)
    ours = ProReflowScheduler.from_config(exported.config, num_windows=2)
    torch.testing.assert_close(ours.schedule.alphas_cumprod, pipeline_table, rtol=0, atol=1e-6)


def test_trailing_ddim_keeps_a_schedule_taken_from_other_defaults():
    """LCMScheduler's defaults (scaled_linear 0.00085 .. 0.012) are not DDIM's: trailing_ddim keeps them,
    where a plain DDIMScheduler.from_config would fall back to DDIM's linear 0.0001 .. 0.02."""
    from diffusers import DDIMScheduler, LCMScheduler

    from proreflow import VPSchedule
    from proreflow.sd.scheduler import TRAILING_DDIM, trailing_ddim

    source = LCMScheduler()
    ddim = trailing_ddim(source.config)
    torch.testing.assert_close(ddim.alphas_cumprod, source.alphas_cumprod, rtol=0, atol=0)
    torch.testing.assert_close(VPSchedule.from_scheduler_config(source.config).alphas_cumprod,
                               ddim.alphas_cumprod.double(), rtol=0, atol=1e-6)  # what training reads
    assert {k: ddim.config[k] for k in TRAILING_DDIM} == TRAILING_DDIM
    plain = DDIMScheduler.from_config(source.config)
    assert (plain.alphas_cumprod - source.alphas_cumprod).abs().max() > 0.1
