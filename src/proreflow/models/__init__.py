"""Small built-in networks and the cache of trained small models."""

from .small import MLPDenoiser, SmallClassifier, adapter_for_spec, build_network, mlp_spec, small_unet
from .store import Entry, cache_root, config_hash, entry_dir, load_entry, load_or_fit, save_entry

__all__ = [
    "Entry", "MLPDenoiser", "SmallClassifier", "adapter_for_spec", "build_network", "cache_root", "config_hash",
    "entry_dir", "load_entry", "load_or_fit", "mlp_spec", "save_entry", "small_unet",
]
