"""The setups ``proreflow train`` distills, by name (the ``setup:`` section): the one table of model families.

A builder is a callable ``fn(**kwargs) -> DistillationSetup``. :data:`SETUPS` names each family's
builder by import path, imported only when that setup is used (so an absent optional dependency
of one family does not break another); every built-in dataset (``proreflow.builtin.DATASETS``)
is a setup of its own, built by :data:`BUILTIN_DATA` with the dataset's name. A config may also
name any builder by import path, ``package.module:function``: a new family needs no entry here.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from ..training.setup import DistillationSetup

SETUPS: dict[str, str] = {
    "stable-diffusion": "proreflow.sd.setup:build_sd_setup",
    "stable-diffusion-3": "proreflow.sd3.setup:build_sd3_setup",
}
"""Setup name -> ``package.module:function`` of its builder."""

BUILTIN_DATA = "proreflow.builtin.teacher:builtin_setup"
"""Builder of each built-in dataset's setup, called as ``builtin_setup(dataset_name, **kwargs)``."""


def _import(path: str) -> Callable[..., Any]:
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"setup.name: cannot import {path!r} ({err})") from None


def builtin_names() -> tuple[str, ...]:
    """The built-in datasets' names (empty where the built-in family cannot be imported)."""
    try:
        from ..builtin.data import DATASETS
    except ImportError:
        return ()
    return tuple(DATASETS)


def get_setup_builder(name: str) -> Callable[..., DistillationSetup]:
    """The builder of setup ``name`` (a key of :data:`SETUPS`, a built-in dataset) or at import path
    ``package.module:function``."""
    if ":" in name:
        return _import(name)
    if name in SETUPS:
        return _import(SETUPS[name])
    if name in builtin_names():
        return functools.partial(_import(BUILTIN_DATA), name)
    known = ", ".join(sorted([*SETUPS, *builtin_names()]))
    raise ValueError(f"setup.name: unknown setup {name!r}; known: {known} "
                     f"(or give an import path, package.module:function)")


def build_setup(spec: dict[str, Any]) -> DistillationSetup:
    """Build a setup from a config's ``setup:`` section: ``{name: NAME, **keyword arguments}``."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str):
        raise ValueError("setup.name: the setup section needs a name, e.g. setup: {name: digits}")
    builder = get_setup_builder(name)
    try:
        setup = builder(**spec)
    except TypeError as err:
        raise ValueError(f"setup {name!r}: {err}") from err
    if not isinstance(setup, DistillationSetup):
        raise TypeError(f"setup {name!r} returned {type(setup).__name__}, not a DistillationSetup")
    return setup
