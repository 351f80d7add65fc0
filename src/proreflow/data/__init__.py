"""Built-in data: 2D toy distributions and small labelled image sets, all shipped offline.

Importing this package registers one distillation setup per built-in dataset with the training
engine's registry (``proreflow.training.setups``), built by
:func:`proreflow.training.teacher.builtin_setup` when first used.
"""

from .builtin import DATASETS, SPLITS, BuiltinDataset, DataSpec, get_spec, load_dataset
from .images import load_digits_images, load_mnist_images
from .toy2d import TOY_SAMPLERS, sample_toy

__all__ = [
    "DATASETS", "SPLITS", "TOY_SAMPLERS", "BuiltinDataset", "DataSpec", "get_spec", "load_dataset",
    "load_digits_images", "load_mnist_images", "sample_toy",
]


def _setup_builder(name: str):
    def build(**kwargs):
        from ..training.teacher import builtin_setup

        return builtin_setup(name, **kwargs)

    build.__doc__ = f"DistillationSetup of the built-in dataset {name!r} (see training.teacher.builtin_setup)."
    build.setup_keys = _builtin_setup_keys  # called when a config is checked
    return build


def _builtin_setup_keys() -> tuple[str, ...]:
    """The keys of a built-in setup: :func:`builtin_setup`'s options and the teacher's settings."""
    import dataclasses
    import inspect

    from ..training.teacher import TeacherConfig, builtin_setup

    params = inspect.signature(builtin_setup).parameters.values()
    own = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    return tuple(own + [f.name for f in dataclasses.fields(TeacherConfig) if f.name not in ("data", *own)])


def _register_setups() -> None:
    try:
        from ..training.setups import register_setup
    except ImportError:  # the training engine is not part of this installation
        return
    for name in DATASETS:
        register_setup(name, _setup_builder(name))


_register_setups()
