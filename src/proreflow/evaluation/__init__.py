"""Evaluation: distances to the true 2D distributions, FD and class accuracy with a feature
classifier (built-in image sets), fidelity to the teacher and trajectory straightness."""

from .classifier import (
    ClassifierConfig,
    TrainedClassifier,
    class_accuracy,
    classifier_config,
    feature_fd,
    load_or_train_classifier,
)
from .distributions import energy_distance, sliced_wasserstein, toy_distances
from .fidelity import fidelity, fidelity_to_teacher, sampler_straightness, straightness, trajectory_times
from .frechet import frechet_distance, frechet_distance_from_stats, gaussian_stats

__all__ = [
    "ClassifierConfig", "TrainedClassifier", "class_accuracy", "classifier_config", "energy_distance", "feature_fd",
    "fidelity", "fidelity_to_teacher", "frechet_distance", "frechet_distance_from_stats", "gaussian_stats",
    "load_or_train_classifier", "sampler_straightness", "sliced_wasserstein", "straightness", "toy_distances",
    "trajectory_times",
]
