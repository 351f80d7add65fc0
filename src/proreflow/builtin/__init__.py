"""Built-in data (2D toy distributions and small labelled image sets, all shipped offline), the
small networks trained on it and the cache of trained small models.

Importing this package registers one distillation setup per built-in dataset with the training
engine's registry (``proreflow.training.setups``), built by
:func:`proreflow.builtin.teacher.builtin_setup` when first used.
"""

from .data import DATASETS, SPLITS, BuiltinDataset, DataSpec, get_spec, load_dataset
from .images import load_digits_images, load_mnist_images
from .networks import MLPDenoiser, SmallClassifier, adapter_for_spec, build_network, mlp_spec, small_unet
from .store import Entry, cache_root, config_hash, entry_dir, load_entry, load_or_fit, save_entry
from .toy2d import TOY_SAMPLERS, sample_toy

__all__ = [
    "DATASETS", "SPLITS", "TOY_SAMPLERS", "BuiltinDataset", "DataSpec", "Entry", "MLPDenoiser", "SmallClassifier",
    "adapter_for_spec", "build_network", "cache_root", "config_hash", "entry_dir", "get_spec", "load_dataset",
    "load_digits_images", "load_entry", "load_mnist_images", "load_or_fit", "mlp_spec", "sample_toy", "save_entry",
    "small_unet",
]


def _setup_builder(name: str):
    def build(**kwargs):
        from .teacher import builtin_setup

        return builtin_setup(name, **kwargs)

    build.__doc__ = f"DistillationSetup of the built-in dataset {name!r} (see training.teacher.builtin_setup)."
    return build


def _register_setups() -> None:
    try:
        from ..training.setups import register_setup
    except ImportError:  # the training engine is not part of this installation
        return
    for name in DATASETS:
        register_setup(name, _setup_builder(name))


_register_setups()
