"""The built-in flow-matching teacher (``teacher="flow"``): its loss, cache key, cache round trip and setup."""


import pytest
import torch
from helpers.gaussian import exact_flow_velocity

import proreflow.builtin.teacher as teacher_module
from proreflow import FlowSchedule, TimeWindows, VPSchedule, sample
from proreflow.builtin.baselines import dpm_solver_sample
from proreflow.builtin.store import config_hash
from proreflow.builtin.teacher import (
    builtin_setup,
    load_or_train_teacher,
    teacher_config,
    teacher_loss,
    train_teacher,
)
from proreflow.training.student import student_module

TINY_2D = {"class": "MLPDenoiser", "kwargs": {"shape": [2], "num_classes": 0, "width": 16, "depth": 1}}
TINY_DIGITS = {"class": "MLPDenoiser", "kwargs": {"shape": [1, 8, 8], "num_classes": 10, "width": 16, "depth": 1}}


def _batch(n=32, mu=0.7, s=0.3):
    g = torch.Generator().manual_seed(0)
    x0 = mu + s * torch.randn(n, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 4, generator=g, dtype=torch.float64)
    t = 1.0 - torch.rand(n, generator=g, dtype=torch.float64)
    return x0, noise, t


def test_flow_loss_is_zero_for_the_exact_velocity_of_point_mass_data():
    # data = mu exactly: u = eps - x0 is a function of x_sigma, E[u | x] = u, so the exact velocity's loss is 0
    mu = 0.7
    x0, noise, t = _batch(s=0.0)
    schedule = FlowSchedule()
    exact = exact_flow_velocity(schedule, mu, 0.0)
    loss = teacher_loss(exact, schedule, "flow_velocity", x0, noise, t)
    assert loss.dtype == torch.float64 and float(loss) < 1e-28
    # the DDPM target (eps) is not what the flow network predicts: far from zero on the same batch
    assert float(teacher_loss(exact, schedule, "epsilon", x0, noise, t)) > 0.1


def test_flow_loss_is_its_formula_on_a_known_batch():
    """``mean (net((1 - sigma) x0 + sigma eps, 1000 sigma) - (eps - x0))^2`` with sigma = t (shift 1)."""
    x0, noise, t = _batch()

    def network(x, timestep, cond):  # any function of (x, timestep) that is not the answer
        return 0.3 * x + (timestep / 1000).reshape(-1, 1) ** 2

    sigma = t.reshape(-1, 1)
    x = (1 - sigma) * x0 + sigma * noise
    expected = (network(x, 1000 * t, None) - (noise - x0)).pow(2).mean()
    loss = teacher_loss(network, FlowSchedule(), "flow_velocity", x0, noise, t)
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0)
    # and the DDPM loss: ``mean (net(sqrt(a) x0 + sqrt(1 - a) eps, max(1000 t - 1, 0)) - eps)^2``
    vp = VPSchedule.from_betas("scaled_linear")
    a = vp.abar(t).reshape(-1, 1)
    x_vp = a.sqrt() * x0 + (1 - a).sqrt() * noise
    expected_vp = (network(x_vp, (1000 * t - 1).clamp(min=0), None) - noise).pow(2).mean()
    torch.testing.assert_close(teacher_loss(network, vp, "epsilon", x0, noise, t), expected_vp, rtol=1e-12, atol=0)


def test_cache_keys_of_ddpm_and_flow_teachers_differ_and_ddpm_keys_are_unchanged():
    for data in ("digits", "moons", "mnist"):
        ddpm, flow = teacher_config(data), teacher_config(data, teacher="flow")
        assert ddpm.teacher == "ddpm" and flow.teacher == "flow"
        assert config_hash(ddpm.to_dict()) != config_hash(flow.to_dict())
        assert "teacher" not in ddpm.to_dict() and flow.to_dict()["teacher"] == "flow"
        assert "beta_schedule" not in flow.to_dict() and flow.offset_noise == 0.0
    # the keys of the DDPM teachers cached (and tabled in docs/research/quality-tables.md) before the teacher kind
    # existed
    assert config_hash(teacher_config("digits").to_dict()) == "5b208e12d063"
    assert config_hash(teacher_config("moons").to_dict()) == "09069b502487"
    assert config_hash(teacher_config("mnist").to_dict()) == "1d3ed1148416"
    assert teacher_config("mnist").offset_noise == 0.1 and teacher_config("mnist", teacher="flow").offset_noise == 0


def test_unknown_teacher_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="setup.teacher: unknown teacher kind 'rectified'; use one of ddpm, flow"):
        teacher_config("digits", teacher="rectified")
    with pytest.raises(ValueError, match="setup.beta_end: a flow teacher has no VP noise schedule"):
        teacher_config("digits", teacher="flow", beta_end=0.02)


def test_flow_teacher_cache_round_trip_is_bit_identical_and_apart_from_the_ddpm_one(tmp_path, monkeypatch):
    flow = train_teacher("moons", teacher="flow", steps=3, network=TINY_2D, cache_dir=tmp_path, progress=False)
    ddpm = train_teacher("moons", steps=3, network=TINY_2D, cache_dir=tmp_path, progress=False)
    assert flow.path.name.startswith("moons-flow-") and flow.path != ddpm.path
    # same seed, same draws, different loss: different weights
    assert not all(torch.equal(a, b) for a, b in zip(flow.module.state_dict().values(),
                                                      ddpm.module.state_dict().values()))
    monkeypatch.setattr(teacher_module, "fit_teacher", lambda *a, **k: pytest.fail("trained again"))
    again = load_or_train_teacher("moons", teacher="flow", steps=3, network=TINY_2D, cache_dir=tmp_path)
    assert not again.trained and again.path == flow.path and again.config == flow.config
    for (k, a), (k2, b) in zip(flow.module.state_dict().items(), again.module.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(flow.denoiser(), noise, TimeWindows(4), 4), sample(again.denoiser(), noise,
                                                                                 TimeWindows(4), 4))


@pytest.mark.parametrize("shift, window_space", [(1.0, "sigma"), (3.0, "unshifted")])
def test_flow_setup_student_stepped_once_per_window_is_euler_over_the_window_edges(tmp_path, shift, window_space):
    """Windows uniform in sigma, or (window_space unshifted) in diffusers' unshifted s with sigma =
    3 s / (1 + 2 s), as SD3 spaces its steps: either way one step per window is the flow-matching Euler step
    between the windows' sigmas, guided."""
    setup = builtin_setup("digits", teacher="flow", steps=2, network=TINY_DIGITS, cache_dir=tmp_path, progress=False,
                          shift=shift, window_space=window_space)
    assert setup.prediction_type == "flow_velocity" and setup.schedule == FlowSchedule(shift, window_space)
    student = student_module(setup, False).double()  # a copy of the teacher's weights, as the engine starts it
    network = setup.adapter(student)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    labels, guidance = torch.arange(6) % 10, 2.0
    x = noise
    edges = TimeWindows(4).edges(torch.float64)
    sigmas = shift * edges / (1 + (shift - 1) * edges)  # shift 1: sigma = t
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):  # flow-matching Euler with classifier-free guidance
        timestep = (1000 * sigma).expand(6)
        u_c, u_u = network(x, timestep, labels), network(x, timestep, setup.uncond.expand(6))
        x = x + (sigma_next - sigma) * (u_u + guidance * (u_c - u_u))
    out = sample(setup.denoiser(student), noise, TimeWindows(4), 4, labels, setup.uncond, guidance)
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)


def test_shift_and_window_space_need_a_flow_teacher(tmp_path):
    with pytest.raises(ValueError, match="set teacher: flow"):
        builtin_setup("moons", steps=1, network=TINY_2D, cache_dir=tmp_path, progress=False, window_space="unshifted",
                      shift=3.0)


def test_dpm_solver_refuses_a_flow_teacher(tmp_path):
    flow = train_teacher("moons", teacher="flow", steps=1, network=TINY_2D, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="needs a VP diffusion teacher"):
        dpm_solver_sample(flow.denoiser(), torch.randn(4, 2), 2)


def test_teacher_command_trains_and_evaluates_a_flow_teacher(tmp_path, capsys):
    from proreflow.cli import main

    args = ["teacher", "--data", "moons", "--teacher", "flow", "--steps", "3", "--cache-dir", str(tmp_path),
            "--quiet", "--threads", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "flow teacher moons" in out and "moons-flow-" in out and "trained in" in out
    assert main(args + ["--eval", "--samples", "500"]) == 0
    out = capsys.readouterr().out
    assert "reused from the cache" in out and "Euler-32" in out and "energy_distance" in out


def test_train_command_setup_key_teacher_flow_builds_the_flow_setup(tmp_path):
    from proreflow.commands.named_setups import build_setup

    setup = build_setup({"name": "moons", "teacher": "flow", "steps": 2, "network": TINY_2D,
                         "cache_dir": str(tmp_path), "progress": False})
    assert setup.prediction_type == "flow_velocity" and isinstance(setup.schedule, FlowSchedule)
    assert setup.info["teacher_config"]["teacher"] == "flow" and "moons-flow-" in setup.info["teacher_path"]
