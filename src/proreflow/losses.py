"""Aligned v-prediction loss: velocity direction weighs more than magnitude.

    L = mean((v_pred - v_tgt)^2) + alpha * (1 - cos(v_pred, v_tgt))
        + beta * (|v_pred| - |v_tgt|)^2 / |v_tgt|^2

cosine and norms per sample over all non-batch dims; terms averaged over the batch with
optional per-sample weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_EPS = 1e-12


@dataclass
class LossTerms:
    """The total loss and its (unweighted-by-alpha/beta) parts, each a scalar."""

    total: Tensor
    mse: Tensor
    direction: Tensor
    magnitude: Tensor


def _safe_norm(v: Tensor) -> Tensor:
    """Per-sample L2 norm with a finite gradient at 0."""
    sq = v.pow(2).sum(dim=1)
    return torch.where(sq > _EPS**2, sq.clamp_min(_EPS**2).sqrt(), torch.zeros_like(sq))


def aligned_v_loss(v_pred: Tensor, v_target: Tensor, alpha: float = 1.0, beta: float = 0.0,
                   weights: Tensor | None = None) -> LossTerms:
    """Aligned v-prediction loss (module doc). Zero vectors give cos = 0 and no NaN."""
    if v_pred.shape != v_target.shape:
        raise ValueError(f"v_pred {tuple(v_pred.shape)} and v_target {tuple(v_target.shape)} differ in shape")
    p = v_pred.float().flatten(1) if v_pred.dtype in (torch.float16, torch.bfloat16) else v_pred.flatten(1)
    g = v_target.to(p.dtype).flatten(1)
    mse = (p - g).pow(2).mean(dim=1)
    np_, ng = _safe_norm(p), _safe_norm(g)
    cos = (p * g).sum(dim=1) / (np_ * ng).clamp_min(_EPS)
    direction = 1 - cos
    magnitude = (np_ - ng).pow(2) / ng.pow(2).clamp_min(_EPS)
    w = torch.ones_like(mse) if weights is None else weights.to(mse)
    w = w / w.sum().clamp_min(_EPS)

    def reduce(term: Tensor) -> Tensor:
        return (w * term).sum()

    terms = LossTerms(total=torch.zeros((), dtype=p.dtype, device=p.device), mse=reduce(mse),
                      direction=reduce(direction), magnitude=reduce(magnitude))
    terms.total = terms.mse + (alpha * terms.direction if alpha else 0) + (beta * terms.magnitude if beta else 0)
    return terms
