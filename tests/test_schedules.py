import pytest
import torch
from diffusers import DDPMScheduler

from proreflow import VPSchedule, convert_output, from_x0_eps, to_x0_eps


@pytest.mark.parametrize("kind,start,end", [("scaled_linear", 0.00085, 0.012), ("linear", 1e-4, 0.02),
                                            ("squaredcos_cap_v2", 1e-4, 0.02)])
@pytest.mark.parametrize("ztsnr", [False, True])
def test_alphas_cumprod_equal_diffusers(kind, start, end, ztsnr):
    ours = VPSchedule.from_betas(kind, 1000, start, end, zero_terminal_snr=ztsnr).alphas_cumprod
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=kind, beta_start=start, beta_end=end,
                        rescale_betas_zero_snr=ztsnr).alphas_cumprod
    torch.testing.assert_close(ours.float(), ref, rtol=1e-5, atol=1e-6)
    if ztsnr:
        assert ours[-1] == 0


def test_from_scheduler_config_matches_sd15():
    cfg = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.equal(VPSchedule.from_scheduler_config(cfg).alphas_cumprod,
                       VPSchedule.from_betas().alphas_cumprod)


def test_time_to_timestep_and_abar_at_integer_steps():
    """``tau = t * T - 1`` (t = (tau + 1) / T), ``abar`` the table there; t in [0, 1 / T] is timestep 0."""
    s = VPSchedule.from_betas()
    tau = torch.arange(1000, dtype=torch.float64)
    t = (tau + 1) / 1000
    torch.testing.assert_close(s.timestep(t), tau, rtol=0, atol=1e-12)
    torch.testing.assert_close(s.time(tau), t, rtol=0, atol=0)
    torch.testing.assert_close(s.abar(t), s.alphas_cumprod, rtol=1e-12, atol=1e-12)
    flat = torch.tensor([0.0, 0.0004, 0.001], dtype=torch.float64)
    torch.testing.assert_close(s.timestep(flat), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(s.abar(flat), s.alphas_cumprod[:1].expand(3), rtol=0, atol=1e-15)
    # halfway between two steps: the mean of the two
    mid = s.abar(torch.tensor([11.5 / 1000], dtype=torch.float64))
    torch.testing.assert_close(mid, (s.alphas_cumprod[10:11] + s.alphas_cumprod[11:12]) / 2)
    assert s.abar(torch.tensor([1.0])).dtype == torch.float32  # float32 at least, never half


@pytest.mark.parametrize("windows", [1, 2, 4, 5, 8, 10])
def test_window_edges_are_the_timesteps_of_diffusers_trailing_ddim(windows):
    """At ``W`` dividing T the edges ``k / W`` are exactly the timesteps DDIMScheduler(trailing) visits, in
    float32 as samplers compute them, and the last step's target ``t = 0`` is ``alphas_cumprod[0]``."""
    from diffusers import DDIMScheduler

    s = VPSchedule.from_betas()
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         timestep_spacing="trailing", set_alpha_to_one=False)
    ddim.set_timesteps(windows)
    edges = torch.tensor([1 - k / windows for k in range(windows)], dtype=torch.float32)
    assert s.timestep(edges).tolist() == ddim.timesteps.float().tolist()
    assert s.abar(torch.tensor(0.0)).item() == pytest.approx(ddim.final_alpha_cumprod.item(), rel=1e-7)


@pytest.mark.parametrize("source", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("target", ["epsilon", "sample", "v_prediction"])
def test_conversions_round_trip_in_float64(source, target):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, 4, 4, generator=g,
                                                                                   dtype=torch.float64)
    abar = torch.rand(5, generator=g, dtype=torch.float64) * 0.98 + 0.01
    a = abar.reshape(-1, 1, 1, 1)
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = from_x0_eps(x0, eps, abar, source)
    x0_back, eps_back = to_x0_eps(out, x, abar, source)
    torch.testing.assert_close(x0_back, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eps_back, eps, rtol=1e-10, atol=1e-10)
    converted = convert_output(out, x, abar, source, target)
    torch.testing.assert_close(converted, from_x0_eps(x0, eps, abar, target), rtol=1e-10, atol=1e-10)


def test_v_prediction_is_finite_at_zero_terminal_snr():
    x = torch.randn(2, 4, dtype=torch.float64)
    x0, eps = to_x0_eps(torch.randn(2, 4, dtype=torch.float64), x, torch.zeros(2, dtype=torch.float64),
                        "v_prediction")
    assert torch.isfinite(x0).all() and torch.equal(eps, x)


def test_unknown_kinds_are_errors():
    with pytest.raises(ValueError, match="beta schedule"):
        VPSchedule.from_betas("cubic")
    with pytest.raises(ValueError, match="not a diffusion output"):
        to_x0_eps(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1) * 0.5, "velocity")


def test_time_of_abar_inverts_abar_in_float64():
    schedule = VPSchedule.from_betas()
    t = torch.linspace(1 / 1000, 1, 4001, dtype=torch.float64)
    torch.testing.assert_close(schedule.time_of_abar(schedule.abar(t)), t, rtol=0, atol=1e-12)
    # clamped outside the table: abar(0) = alphas_cumprod[0] is reached at t = 1 / T, abar below the last at 1
    assert schedule.time_of_abar(torch.tensor([1.0, 0.0])).tolist() == [1 / 1000, 1.0]
