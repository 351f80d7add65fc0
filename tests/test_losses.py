import pytest
import torch

from proreflow import aligned_v_loss


def test_zero_at_equality_and_mse_closed_form():
    v = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    terms = aligned_v_loss(v, v, alpha=2.0, beta=1.0)
    assert terms.total.item() == pytest.approx(0.0, abs=1e-12)
    shifted = aligned_v_loss(v + 0.5, v, alpha=0.0)
    assert shifted.total.item() == pytest.approx(0.25, rel=1e-12)


def test_direction_term_is_invariant_to_positive_scaling_and_two_for_opposite_vectors():
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, 10, generator=g, dtype=torch.float64)
    base = aligned_v_loss(p, t).direction
    torch.testing.assert_close(aligned_v_loss(3.7 * p, t).direction, base)
    assert aligned_v_loss(-t, t).direction.item() == pytest.approx(2.0)
    cos = torch.nn.functional.cosine_similarity(p, t, dim=1)
    torch.testing.assert_close(base, (1 - cos).mean())


def test_total_combines_terms_and_magnitude_closed_form():
    t = torch.randn(3, 8, dtype=torch.float64)
    p = 2.0 * t  # same direction, twice the length: magnitude term (|2t| - |t|)^2 / |t|^2 = 1
    terms = aligned_v_loss(p, t, alpha=0.5, beta=0.25)
    assert terms.magnitude.item() == pytest.approx(1.0)
    assert terms.direction.item() == pytest.approx(0.0, abs=1e-12)
    assert terms.total.item() == pytest.approx(terms.mse.item() + 0.25)


def test_per_sample_weights():
    t = torch.zeros(2, 4, dtype=torch.float64)
    p = torch.stack([torch.ones(4), 3 * torch.ones(4)]).double()
    w = torch.tensor([3.0, 1.0], dtype=torch.float64)
    assert aligned_v_loss(p, t, alpha=0.0, weights=w).total.item() == pytest.approx((3 * 1 + 1 * 9) / 4)


def test_zero_vectors_give_finite_values_and_gradients():
    p = torch.zeros(2, 6, dtype=torch.float64, requires_grad=True)
    t = torch.cat([torch.zeros(1, 6), torch.randn(1, 6)]).double()
    terms = aligned_v_loss(p, t, alpha=1.0, beta=1.0)
    terms.total.backward()
    assert torch.isfinite(terms.total) and torch.isfinite(p.grad).all()


def test_half_precision_predictions_are_reduced_in_float32_and_shape_mismatch_is_an_error():
    p = torch.randn(2, 4).bfloat16()
    assert aligned_v_loss(p, p.float()).total.dtype == torch.float32
    with pytest.raises(ValueError, match="differ in shape"):
        aligned_v_loss(torch.zeros(2, 4), torch.zeros(2, 5))


# ---------------------------------------------------------------- loss spaces and time weights

from proreflow.losses import snr, time_weights, to_loss_space, velocity_per_epsilon  # noqa: E402
from proreflow.parametrize import output_to_velocity  # noqa: E402
from proreflow.schedules import VPSchedule  # noqa: E402


def _window_batch():
    """Float64 batch with times in 4 windows, a student epsilon and the teacher's target velocity."""
    g = torch.Generator().manual_seed(3)
    sched = VPSchedule.from_betas("scaled_linear")
    t = torch.tensor([0.95, 0.9, 0.6, 0.55, 0.3, 0.1, 1.0, 0.74], dtype=torch.float64)
    t_end = torch.floor((t - 1e-9) * 4) / 4
    t_start = t_end + 0.25
    x = torch.randn(8, 2, 3, generator=g, dtype=torch.float64)
    eps_pred, eps_tgt = torch.randn(2, 8, 2, 3, generator=g, dtype=torch.float64)
    v_pred, v_tgt = (output_to_velocity(e, x, t, t_end, "epsilon", sched) for e in (eps_pred, eps_tgt))
    return sched, t, t_start, t_end, x, eps_pred, eps_tgt, v_pred, v_tgt


def _c(sched, t, s):
    a_t, a_s = sched.abar(t), sched.abar(s)
    return ((1 - a_s).sqrt() - (a_s * (1 - a_t) / a_t).sqrt()) / (s - t)


def test_epsilon_space_is_the_epsilon_output_and_velocity_error_over_c():
    sched, t, t_start, t_end, x, eps_pred, eps_tgt, v_pred, v_tgt = _window_batch()
    torch.testing.assert_close(to_loss_space(v_pred, x, t, t_end, "epsilon", sched), eps_pred)
    torch.testing.assert_close(to_loss_space(v_tgt, x, t, t_end, "epsilon", sched), eps_tgt)
    c = _c(sched, t, t_end).reshape(-1, 1, 1)
    torch.testing.assert_close(v_pred - v_tgt, c * (eps_pred - eps_tgt))
    # x0 space: x0 = (x - sqrt(1 - a) eps) / sqrt(a), so the x0 error is -sqrt((1 - a) / a) times the eps error
    a = sched.abar(t).reshape(-1, 1, 1)
    dx0 = to_loss_space(v_pred, x, t, t_end, "x0", sched) - to_loss_space(v_tgt, x, t, t_end, "x0", sched)
    torch.testing.assert_close(dx0, -((1 - a) / a).sqrt() * (eps_pred - eps_tgt))
    terms = aligned_v_loss(v_pred, v_tgt, alpha=0.0, space_pred=eps_pred, space_target=eps_tgt)
    assert terms.mse.item() == pytest.approx((eps_pred - eps_tgt).pow(2).mean().item(), rel=1e-12)


def test_geometric_space_is_the_geometric_mean_of_velocity_and_epsilon_errors():
    sched, t, t_start, t_end, x, eps_pred, eps_tgt, v_pred, v_tgt = _window_batch()
    from proreflow.losses import velocity_per_epsilon

    torch.testing.assert_close(velocity_per_epsilon(t, t_end, sched), _c(sched, t, t_end))
    assert (_c(sched, t, t_end) > 0).all()
    sp, sg = (to_loss_space(v, x, t, t_end, "geometric", sched) for v in (v_pred, v_tgt))
    per = (sp - sg).pow(2).flatten(1).mean(1)
    vel = (v_pred - v_tgt).pow(2).flatten(1).mean(1)
    eps = (eps_pred - eps_tgt).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(per, (vel * eps).sqrt())


def test_capped_epsilon_space_is_epsilon_below_the_cap_and_scaled_velocity_above():
    sched, t, t_start, t_end, x, eps_pred, eps_tgt, v_pred, v_tgt = _window_batch()
    c = _c(sched, t, t_end)
    cap = float(c.median())  # some samples on each side
    assert (c > cap).any() and (c < cap).any()
    sp, sg = (to_loss_space(v, x, t, t_end, "capped_epsilon", sched, c_cap=cap) for v in (v_pred, v_tgt))
    below = c <= cap
    torch.testing.assert_close((sp - sg)[below], (eps_pred - eps_tgt)[below])
    torch.testing.assert_close((sp - sg)[~below], (v_pred - v_tgt)[~below] / cap)
    # a cap above every c gives the epsilon space's errors exactly (the values differ by a term free of v)
    sp, sg = (to_loss_space(v, x, t, t_end, "capped_epsilon", sched, c_cap=1e6) for v in (v_pred, v_tgt))
    torch.testing.assert_close(sp - sg, eps_pred - eps_tgt)


@pytest.mark.parametrize("space", ["velocity", "epsilon", "x0", "geometric", "capped_epsilon"])
def test_every_space_loss_is_zero_exactly_when_the_velocity_loss_is(space):
    sched, t, t_start, t_end, x, eps_pred, eps_tgt, v_pred, v_tgt = _window_batch()
    for pred, zero in ((v_tgt.clone(), True), (v_pred, False)):
        sp, sg = (to_loss_space(v, x, t, t_end, space, sched) for v in (pred, v_tgt))
        mse = aligned_v_loss(pred, v_tgt, alpha=1.0, space_pred=sp, space_target=sg).mse.item()
        vel = aligned_v_loss(pred, v_tgt, alpha=1.0).mse.item()
        assert (mse < 1e-24) == (vel < 1e-24) == zero


def test_time_weights_equal_their_formulas():
    sched, t, t_start, t_end, x, eps_pred, eps_tgt, v_pred, v_tgt = _window_batch()
    torch.testing.assert_close(time_weights("none", t, t_start, t_end, v_tgt), torch.ones(8, dtype=torch.float64))
    a = sched.abar(t)
    ratio = a / (1 - a)
    torch.testing.assert_close(snr(t, sched), ratio)
    expected = torch.minimum(ratio, torch.full_like(ratio, 5.0)) / ratio
    torch.testing.assert_close(time_weights("min_snr", t, t_start, t_end, v_tgt, sched, 5.0), expected)
    assert expected[5] < 1 and expected[0] == 1  # t = 0.1 (SNR > 5) is clamped, t = 0.95 not
    w = time_weights("window", t, t_start, t_end, v_tgt)
    size = v_tgt.pow(2).flatten(1).mean(1)
    for i in range(8):
        same = t_start == t_start[i]
        assert w[i].item() == pytest.approx(1 / size[same].mean().item(), rel=1e-12)
    # the MSE term is sum_i u_i w_i mse_i with u = 1 / batch (mse weights are not normalised)
    terms = aligned_v_loss(v_pred, v_tgt, alpha=0.0, mse_weights=w)
    per = (v_pred - v_tgt).pow(2).flatten(1).mean(1)
    assert terms.mse.item() == pytest.approx((w * per).mean().item(), rel=1e-12)


def test_unknown_space_and_weighting_are_errors_naming_the_choices():
    v = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="velocity, epsilon, x0, geometric"):
        to_loss_space(v, v, torch.ones(2), torch.zeros(2), "noise")
    with pytest.raises(ValueError, match="none, min_snr, window, start_epsilon"):
        time_weights("snr", torch.ones(2), torch.ones(2), torch.zeros(2), v)


def test_vp_only_loss_spaces_and_weighting_refuse_a_flow_teacher():
    from proreflow import FlowSchedule

    _, t, t_start, t_end, x, _, _, v_pred, v_tgt = _window_batch()
    torch.testing.assert_close(to_loss_space(v_pred, x, t, t_end, "velocity", FlowSchedule()), v_pred)
    for space in ("epsilon", "x0", "geometric", "capped_epsilon"):
        with pytest.raises(ValueError, match=f"the '{space}' loss space needs the teacher's VPSchedule"):
            to_loss_space(v_pred, x, t, t_end, space, FlowSchedule())
    with pytest.raises(ValueError, match="min_snr weighting needs the teacher's VPSchedule"):
        time_weights("min_snr", t, t_start, t_end, v_tgt, FlowSchedule())


@pytest.mark.parametrize("space", ["epsilon", "x0", "geometric", "capped_epsilon"])
def test_flat_abar_below_one_timestep_gives_zero_error_and_finite_gradients(space):
    """On the trailing grid abar is flat for t <= 1 / T, so a window ending at 0 holds times whose DDIM
    step is empty (c = 0): those samples carry no error in any space but velocity, and nothing is NaN."""
    sched, t, t_start, t_end, x, eps_pred, eps_tgt, v_pred, v_tgt = _window_batch()
    flat_t = torch.tensor([0.0004, 1.0 / sched.num_train_timesteps], dtype=torch.float64)
    assert (sched.abar(flat_t) == sched.abar(torch.zeros(2, dtype=torch.float64))).all()
    t2, s2 = torch.cat([t, flat_t]), torch.cat([t_end, torch.zeros(2, dtype=torch.float64)])
    x2 = torch.cat([x, torch.randn(2, 2, 3, dtype=torch.float64)])
    vp = torch.cat([v_pred, torch.randn(2, 2, 3, dtype=torch.float64)]).requires_grad_(True)
    vt = torch.cat([v_tgt, torch.randn(2, 2, 3, dtype=torch.float64)])
    assert (velocity_per_epsilon(t2, s2, sched)[-2:] == 0).all()
    sp, sg = (to_loss_space(v, x2, t2, s2, space, sched) for v in (vp, vt))
    assert (sp[-2:] == 0).all() and (sg[-2:] == 0).all()
    torch.testing.assert_close(sp[:-2], to_loss_space(v_pred, x, t, t_end, space, sched))
    mse = aligned_v_loss(vp, vt, alpha=1.0, space_pred=sp, space_target=sg).mse
    mse.backward()
    assert torch.isfinite(mse) and torch.isfinite(vp.grad).all() and (vp.grad[-2:] == 0).all()


def test_start_epsilon_equals_its_formula_and_gives_the_epsilon_spaces_balance_at_window_starts():
    """start_epsilon = c(h, 0)^2 / c(t_start, s)^2 (h = t_start - s): 1 on the window ending at 0, constant
    inside a window, and at the window starts the velocity space weighted by it is the epsilon space's squared
    error times c(h, 0)^2."""
    sched, t, t_start, t_end, x, eps_pred, eps_tgt, v_pred, v_tgt = _window_batch()
    h = t_start - t_end
    c_last = _c(sched, h, torch.zeros_like(h))
    w = time_weights("start_epsilon", t, t_start, t_end, v_tgt, sched)
    torch.testing.assert_close(w, (c_last / _c(sched, t_start, t_end)) ** 2)
    last = t_end == 0
    assert last.any() and (~last).any()
    torch.testing.assert_close(w[last], torch.ones_like(w[last]))
    assert (w[~last] < 1).all()  # the noisier windows weigh less, as in the epsilon space
    same = t_start == t_start[0]
    assert same.sum() > 1 and (w[same] == w[same][0]).all()
    # the same batch moved to its window starts (x_t kept: the spaces' maps depend on t, not on x_t's law)
    v_p, v_t = (output_to_velocity(e, x, t_start, t_end, "epsilon", sched) for e in (eps_pred, eps_tgt))
    w0 = time_weights("start_epsilon", t_start, t_start, t_end, v_t, sched)
    vel = (w0 * (v_p - v_t).pow(2).flatten(1).mean(1)).mean()
    sp, sg = (to_loss_space(v, x, t_start, t_end, "epsilon", sched) for v in (v_p, v_t))
    eps = (c_last**2 * (sp - sg).pow(2).flatten(1).mean(1)).mean()
    assert vel.item() == pytest.approx(eps.item(), rel=1e-10)
