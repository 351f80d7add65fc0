"""The setups ``proreflow train`` distills, by name (the ``setup:`` section): the one table of model families.

A builder is a callable ``fn(**kwargs) -> DistillationSetup``. :data:`FAMILIES` names each family's
builder (and its export, samplers and pipelines, which the other commands read) by import path, imported
only when that family is used (so an absent optional dependency of one family does not break another);
every built-in dataset (``proreflow.builtin.DATASETS``) is a setup of its own, built by :data:`BUILTIN_DATA`
with the dataset's name. A config may also name any builder by import path, ``package.module:function``: a
new family needs no entry here to train (export, sample and eval serve the families of the table).
That imports and runs code a config names, so it is allowed only when the user says they trust the
config: ``proreflow train --trust-setup-code`` (``trust=True`` here) or the environment variable
``PROREFLOW_TRUST_SETUP_CODE=1`` (:func:`setup_code_trusted`); the named families and built-in
datasets need neither.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..training.setup import DistillationSetup


@dataclass(frozen=True)
class Family:
    """One model family as every command reads it. Each entry is an import path (``package.module:name``),
    imported only when that family is used (:func:`load`)."""

    builder: str                            # its setup builder (``setup.name`` of its runs: the FAMILIES key)
    pipelines: str                          # the diffusers pipeline classes of its teachers and exports (a tuple)
    export: str                             # ``proreflow export``'s step for its runs
    lora_export: bool                       # whether ``proreflow export --lora`` serves it
    student_pipeline: str | None = None     # loads an exported student for ``proreflow sample`` (None: not served)
    sample_schedule: str | None = None      # the pipeline call's schedule keywords for a step count
    eval_methods: str | None = None         # ``proreflow eval``'s teacher and student samplers (None: not served)


FAMILIES: dict[str, Family] = {
    "stable-diffusion": Family(
        "proreflow.sd.setup:build_sd_setup", "proreflow.sd.pipeline:SUPPORTED_PIPELINES",
        "proreflow.commands.export:export_sd", True, "proreflow.sd.export:load_student_pipeline",
        "proreflow.commands.sample:sd_schedule", "proreflow.commands.eval:sd_methods"),
    "stable-diffusion-3": Family(
        "proreflow.sd3.setup:build_sd3_setup", "proreflow.sd3.pipeline:PIPELINES",
        "proreflow.commands.export:export_sd3", True, "proreflow.sd3.export:load_sd3_student_pipeline",
        "proreflow.commands.sample:sd3_schedule", "proreflow.commands.eval:sd3_methods"),
    "pixart": Family(
        "proreflow.pixart.setup:build_pixart_setup", "proreflow.pixart.pipeline:SUPPORTED_PIPELINES",
        "proreflow.commands.export:export_pixart", False),
}
"""Setup name -> its family: the one table that ``train``, ``export``, ``sample`` and ``eval`` read."""


def load(path: str) -> Any:
    """The object at import path ``package.module:name``."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def family_of_pipeline(class_name: str | None) -> tuple[str, Family] | None:
    """The family (name, entry) whose pipelines include ``class_name`` (a ``model_index.json``'s
    ``_class_name``), or None."""
    for name, family in FAMILIES.items():
        if class_name in load(family.pipelines):
            return name, family
    return None


BUILTIN_DATA = "proreflow.builtin.teacher:builtin_setup"
"""Builder of each built-in dataset's setup, called as ``builtin_setup(dataset_name, **kwargs)``."""


MOVED_TO_RECIPE = {
    "gradient_checkpointing": "gradient checkpointing is now the recipe key gradient_checkpointing (for every "
                              "setup): move it out of the setup section, e.g. gradient_checkpointing: true at "
                              "the top level of the config",
}
"""Setup keys of earlier versions that became recipe keys -> the one-line fix."""


TRUST_ENV = "PROREFLOW_TRUST_SETUP_CODE"
"""The environment variable that, set to 1, allows ``setup.name`` to be an import path (as ``--trust-setup-code``)."""


def setup_code_trusted(trust: bool = False) -> bool:
    """Whether a config may name code to run (``setup.name: package.module:function``): ``trust`` (the
    ``--trust-setup-code`` flag) or ``PROREFLOW_TRUST_SETUP_CODE=1`` in the environment."""
    return bool(trust) or os.environ.get(TRUST_ENV) == "1"


def _import(path: str) -> Callable[..., Any]:
    try:
        return load(path)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"setup.name: cannot import {path!r} ({err})") from None


def builtin_names() -> tuple[str, ...]:
    """The built-in datasets' names (empty where the built-in family cannot be imported)."""
    try:
        from ..builtin.data import DATASETS
    except ImportError:
        return ()
    return tuple(DATASETS)


def get_setup_builder(name: str, trust: bool = False) -> Callable[..., DistillationSetup]:
    """The builder of setup ``name`` (a key of :data:`FAMILIES`, a built-in dataset) or at import path
    ``package.module:function``: code the config names, imported only when trusted
    (:func:`setup_code_trusted`; else a ValueError naming setup.name and the flag, nothing imported)."""
    if ":" in name:
        if not setup_code_trusted(trust):
            raise ValueError(f"setup.name: {name!r} is an import path: the config asks to run its code, which "
                             f"proreflow does only with --trust-setup-code (or {TRUST_ENV}=1); pass it if you "
                             f"trust this config, or name a setup ({', '.join(sorted([*FAMILIES, *builtin_names()]))})")
        return _import(name)
    if name in FAMILIES:
        return _import(FAMILIES[name].builder)
    if name in builtin_names():
        return functools.partial(_import(BUILTIN_DATA), name)
    known = ", ".join(sorted([*FAMILIES, *builtin_names()]))
    raise ValueError(f"setup.name: unknown setup {name!r}; known: {known} "
                     f"(or give an import path, package.module:function)")


def setup_keys(builder: Callable[..., DistillationSetup]) -> tuple[str, ...] | None:
    """The keyword arguments ``builder`` takes: its ``setup_keys`` attribute (a tuple, or a function
    that returns one; looked up on a ``functools.partial``'s function too), else its signature's
    (None when it takes any ``**kwargs``)."""
    keys = getattr(builder, "setup_keys", None) or getattr(getattr(builder, "func", None), "setup_keys", None)
    if keys is not None:
        return tuple(keys() if callable(keys) else keys)
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def check_setup_spec(spec: Any, trust: bool = False) -> Callable[..., DistillationSetup]:
    """The builder of a ``setup:`` section, after checking its name and keys (nothing is built); ``trust``:
    an import path may name it (:func:`get_setup_builder`)."""
    if not isinstance(spec, dict):
        raise ValueError(f"setup: expected a mapping such as {{name: digits}}, got {spec!r}")
    name = spec.get("name")
    if not isinstance(name, str):
        raise ValueError("setup.name: the setup section needs a name, e.g. setup: {name: digits}")
    builder = get_setup_builder(name, trust)
    keys = setup_keys(builder)
    for key in spec:
        if key in MOVED_TO_RECIPE:
            raise ValueError(f"setup.{key}: {MOVED_TO_RECIPE[key]}")
    if keys is None:
        return builder
    unknown = [k for k in spec if k != "name" and k not in keys]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), keys, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"setup.{unknown[0]}: {name!r} takes no key {unknown[0]!r}{hint}; valid keys: "
                         f"{', '.join(keys)}")
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):
        return builder
    missing = [p.name for p in signature.parameters.values() if p.default is p.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in spec]
    if missing:
        raise ValueError(f"setup.{missing[0]}: setup {name!r} needs the key {missing[0]!r}; valid keys: "
                         f"{', '.join(keys)}")
    try:
        hints = typing.get_type_hints(builder)
    except Exception:  # a builder whose annotations do not resolve: its own checks apply
        hints = {}
    for key, value in spec.items():
        if key in hints and not fits(value, hints[key]):
            raise ValueError(f"setup.{key}: expected {describe_type(hints[key])}, got {value!r}")
    return builder


def fits(value: Any, hint: Any) -> bool:
    """Whether a config value has the type a builder's annotation asks for (``bool`` is not an ``int``, an
    ``int`` is a ``float``; annotations this cannot read accept anything)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arm) for arm in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple)) and all(fits(v, args[0]) for v in value) if args else \
            isinstance(value, (list, tuple))
    return True


def describe_type(hint: Any) -> str:
    """An annotation in a config's words: ``true or false``, ``an integer``, ``a list of text or null``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(arm) for arm in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a text", type(None): "null"}
    if hint in words:
        return words[hint]
    if origin in (list, tuple):
        plural = {bool: "true / false values", int: "integers", float: "numbers", str: "texts"}
        return f"a list of {plural.get(args[0], describe_type(args[0]))}" if args else "a list"
    return getattr(hint, "__name__", str(hint))


def build_setup(spec: dict[str, Any], trust: bool = False) -> DistillationSetup:
    """Build a setup from a config's ``setup:`` section: ``{name: NAME, **keyword arguments}``
    (checked first by :func:`check_setup_spec`; ``trust`` as there); the section as given is its ``section``."""
    builder = check_setup_spec(spec, trust)
    spec = dict(spec)
    name = spec.pop("name")
    try:
        setup = builder(**spec)
    except TypeError as err:
        raise ValueError(f"setup {name!r}: {err}") from err
    if not isinstance(setup, DistillationSetup):
        raise TypeError(f"setup {name!r} returned {type(setup).__name__}, not a DistillationSetup")
    setup.section = {"name": name, **spec}  # the run records it (training.setup.setup_identity)
    setup.section_defaults = builder_defaults(builder)
    return setup


def builder_defaults(builder: Callable[..., DistillationSetup]) -> dict[str, Any]:
    """The defaults of ``builder``'s keyword arguments (JSON values): a setup key a section leaves out has this
    value, so a resume compares sections by what they mean (:func:`~proreflow.training.progressive.check_setup`)."""
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not p.empty
            and isinstance(p.default, (str, int, float, bool, type(None)))}
