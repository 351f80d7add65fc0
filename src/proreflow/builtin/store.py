"""Cache of small trained models (teachers, feature classifiers): safetensors weights + JSON record.

Layout: ``<root>/<kind>/<name>-<hash>/{model.safetensors, config.json}`` where ``root`` is
``cache_dir`` if given, else ``$PROREFLOW_CACHE``, else ``~/.cache/proreflow``; ``hash`` is the
first 12 hex digits of the SHA-256 of the training config as canonical JSON, so a changed
config trains a new model and an unchanged one is reused. Files are written atomically
(:mod:`proreflow.files`); ``config.json`` is written last and marks a
complete entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from ..files import atomic_write, atomic_write_text
from ..training.checkpoint import first_nonfinite
from .networks import build_network

CACHE_ENV = "PROREFLOW_CACHE"
WEIGHTS, RECORD = "model.safetensors", "config.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$PROREFLOW_CACHE``, else ``~/.cache/proreflow``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "proreflow").expanduser()


def config_hash(config: dict[str, Any]) -> str:
    """First 12 hex digits of SHA-256 over the config as sorted, compact JSON."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def entry_dir(kind: str, name: str, config: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    """``<root>/<kind>/<name>-<hash(config)>``."""
    return cache_root(cache_dir) / kind / f"{name}-{config_hash(config)}"


def save_entry(directory: Path, module: nn.Module, record: dict[str, Any]) -> None:
    """Write ``module``'s weights and ``record`` (needs ``record["network"]``, a spec) atomically."""
    if "network" not in record:
        raise ValueError("a cache record needs the network spec under 'network' to rebuild the module")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RECORD).unlink(missing_ok=True)  # incomplete until the record is back
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write(directory / WEIGHTS, lambda p: save_file(state, str(p)))
    atomic_write_text(directory / RECORD, json.dumps(record, indent=2, sort_keys=True))


def load_entry(directory: Path) -> tuple[nn.Module, dict[str, Any]] | None:
    """``(module, record)`` from a complete entry, or None when there is none; a damaged entry (unreadable
    record, truncated weights) is a ValueError naming the file and the fix."""
    if not (directory / RECORD).is_file() or not (directory / WEIGHTS).is_file():
        return None
    fix = f"delete {directory} or retrain (--force)"
    try:
        record = json.loads((directory / RECORD).read_text())
        module = build_network(record["network"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"the cached record {directory / RECORD} is damaged ({type(err).__name__}: {err}); "
                         f"{fix}") from None
    try:
        state = load_file(str(directory / WEIGHTS))
    except Exception as err:  # safetensors raises its own SafetensorError on truncated or garbled files
        raise ValueError(f"the cached weights {directory / WEIGHTS} are damaged ({err}); {fix}") from None
    bad = first_nonfinite(state)
    if bad:
        raise ValueError(f"the cached weights {directory / WEIGHTS} are damaged ({bad}); {fix}")
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"the cached model in {directory} does not fit this version of the code; "
                         f"{fix}: {err}") from err
    return module.eval().requires_grad_(False), record


MIN_FREE_BYTES = 64 * 2**20
"""Free space a cache folder needs before a model is trained into it (the built-in models take a few MB)."""


def check_writable(directory: Path, need: int = MIN_FREE_BYTES) -> None:
    """Make ``directory`` and write a probe file in it, and check it has ``need`` bytes free: a read-only,
    full or misplaced cache fails here, before minutes of training, with one line naming it."""
    import shutil
    import tempfile

    fix = f"set --cache-dir or ${CACHE_ENV} to a writable folder with space"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
        free = shutil.disk_usage(directory).free
    except OSError as err:
        raise ValueError(f"cache folder {directory} cannot be written ({err.strerror or err}); {fix}") from None
    if free < need:
        raise ValueError(f"cache folder {directory} has {free / 2**20:.0f} MiB free, {need / 2**20:.0f} MiB are "
                         f"needed; {fix}")


@dataclass
class Entry:
    """A cached model: the module (eval mode, frozen), its record, its folder, and whether it was just fitted."""

    module: nn.Module
    record: dict[str, Any]
    path: Path
    fitted: bool


def load_or_fit(kind: str, name: str, config: dict[str, Any], network: dict[str, Any],
                fit: Callable[[], tuple[nn.Module, dict[str, Any]]], cache_dir: str | os.PathLike | None = None,
                force: bool = False) -> Entry:
    """The cached entry for ``config``, or ``fit()`` it and cache it (always with ``force``).

    ``fit`` returns ``(module, stats)``; the record stored is
    ``{"kind", "name", "config", "network", "stats"}``.
    """
    directory = entry_dir(kind, name, config, cache_dir)
    entry = None if force else load_entry(directory)
    if entry is not None:
        return Entry(*entry, directory, fitted=False)
    made = not directory.exists()
    try:
        check_writable(directory)
        module, stats = fit()
        record = {"kind": kind, "name": name, "config": config, "network": network, "stats": stats}
        save_entry(directory, module, record)
    except BaseException:  # a full disk, a stop signal: no incomplete entry of ours is left behind
        if made:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return Entry(module.eval().requires_grad_(False), record, directory, fitted=True)
