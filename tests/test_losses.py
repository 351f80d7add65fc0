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
