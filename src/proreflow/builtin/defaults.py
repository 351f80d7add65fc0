"""Defaults of the built-in datasets shared by ``proreflow demo`` and ``benchmarks/quality.py``:
the guidance scale per kind of data and the evaluation sample count."""

from __future__ import annotations

from .data import get_spec

GUIDANCE = {"2d": 1.0, "digits": 2.0, "mnist": 2.0}
"""Classifier-free guidance scale per :func:`data_kind` (2D toy data is unconditional)."""


def data_kind(data: str) -> str:
    """'2d' for 2D toy data, else the dataset's name (the key of GUIDANCE and of the demo's DEMO_STEPS)."""
    return "2d" if get_spec(data).is_2d else data


def default_eval_samples(data: str) -> int:
    """Evaluation samples per sampler: 10000 for 2D data (distances have a ~1/sqrt(n) floor), 1000 for images."""
    return 10_000 if get_spec(data).is_2d else 1000
