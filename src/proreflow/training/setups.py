"""Registry of named setup builders: what ``proreflow train`` distills (the ``setup:`` section).

A builder is a callable ``fn(**kwargs) -> DistillationSetup``. Modules that provide setups
register them with :func:`register_setup` (the built-in datasets and Stable Diffusion do so
when imported); a config may also name any builder by import path, ``package.module:function``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from .setup import DistillationSetup

SETUPS: dict[str, Callable[..., DistillationSetup]] = {}

BUILTIN_MODULES = ("proreflow.data", "proreflow.models.stable_diffusion")
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


def setup_keys(builder: Callable[..., DistillationSetup]) -> tuple[str, ...] | None:
    """The keyword arguments ``builder`` takes: its ``setup_keys`` attribute (a tuple, or a function
    that returns one), else its signature's (None when it takes any ``**kwargs``)."""
    keys = getattr(builder, "setup_keys", None)
    if keys is not None:
        return tuple(keys() if callable(keys) else keys)
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def check_setup_spec(spec: Any) -> Callable[..., DistillationSetup]:
    """The builder of a ``setup:`` section, after checking its name and keys (nothing is built)."""
    if not isinstance(spec, dict):
        raise ValueError(f"setup: expected a mapping such as {{name: digits}}, got {spec!r}")
    name = spec.get("name")
    if not isinstance(name, str):
        raise ValueError("setup.name: the setup section needs a name, e.g. setup: {name: digits}")
    builder = get_setup_builder(name)
    keys = setup_keys(builder)
    if keys is not None:
        unknown = [k for k in spec if k != "name" and k not in keys]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"setup.{unknown[0]}: {name!r} takes no key {unknown[0]!r}{hint}; valid keys: "
                             f"{', '.join(keys)}")
        try:
            signature = inspect.signature(builder)
        except (TypeError, ValueError):
            signature = None
        if signature is not None:
            missing = [p.name for p in signature.parameters.values() if p.default is p.empty
                       and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in spec]
            if missing:
                raise ValueError(f"setup.{missing[0]}: setup {name!r} needs the key {missing[0]!r}; valid keys: "
                                 f"{', '.join(keys)}")
    return builder


def build_setup(spec: dict[str, Any]) -> DistillationSetup:
    """Build a setup from a config's ``setup:`` section: ``{name: NAME, **keyword arguments}``
    (checked first by :func:`check_setup_spec`)."""
    builder = check_setup_spec(spec)
    spec = dict(spec)
    name = spec.pop("name")
    try:
        setup = builder(**spec)
    except TypeError as err:
        raise ValueError(f"setup {name!r}: {err}") from err
    if not isinstance(setup, DistillationSetup):
        raise TypeError(f"setup {name!r} returned {type(setup).__name__}, not a DistillationSetup")
    return setup
