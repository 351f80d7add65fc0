"""Model-free evaluation: Frechet distance, fidelity to the teacher, trajectory straightness, plots."""

from .fidelity import fidelity, fidelity_to_teacher, sampler_straightness, straightness, trajectory_times
from .frechet import frechet_distance, frechet_distance_from_stats, gaussian_stats

__all__ = [
    "fidelity", "fidelity_to_teacher", "frechet_distance", "frechet_distance_from_stats", "gaussian_stats",
    "sampler_straightness", "straightness", "trajectory_times",
]
