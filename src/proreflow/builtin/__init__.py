"""Built-in data (2D toy distributions and small labelled image sets, all shipped offline), the
small networks trained on it and the cache of trained small models.

Each dataset is a distillation setup (:func:`proreflow.builtin.teacher.builtin_setup`), named
for ``proreflow train`` by ``proreflow.commands.named_setups``.
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
