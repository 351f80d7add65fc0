"""Registry of named setup builders: what ``proreflow train`` distills (the ``setup:`` section).

A builder is a callable ``fn(**kwargs) -> DistillationSetup``. Modules that provide setups
register them with :func:`register_setup` (the built-in datasets and Stable Diffusion do so
when imported); a config may also name any builder by import path, ``package.module:function``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .setup import DistillationSetup

SETUPS: dict[str, Callable[..., DistillationSetup]] = {}

BUILTIN_MODULES = ("proreflow.builtin", "proreflow.sd.pipeline")
"""Imported before a lookup so that their setups are registered (skipped when absent)."""


def register_setup(name: str, builder: Callable[..., DistillationSetup]) -> Callable[..., DistillationSetup]:
    """Register ``builder`` under ``name`` (returns it, so it can decorate a function)."""
    SETUPS[name] = builder
    return builder


def _import_builtins() -> dict[str, str]:
    """Import the built-in setup modules; returns why each one that failed could not be imported."""
    failed = {}
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as err:  # absent, or an optional dependency of it is missing
            failed[module] = str(err)
    return failed


def get_setup_builder(name: str) -> Callable[..., DistillationSetup]:
    """The builder registered as ``name``, or the function at import path ``package.module:function``."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"setup.name: cannot import {name!r} ({err})") from None
    failed = _import_builtins() if name not in SETUPS else {}
    if name not in SETUPS:
        known = ", ".join(sorted(SETUPS)) or "none registered"
        why = "".join(f"; {module} could not be imported ({err})" for module, err in failed.items())
        raise ValueError(f"setup.name: unknown setup {name!r}; known: {known} "
                         f"(or give an import path, package.module:function){why}")
    return SETUPS[name]


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
