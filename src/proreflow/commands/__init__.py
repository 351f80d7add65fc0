"""The subcommands of ``proreflow`` (one module each), and the checks of their arguments they share.

Bad input is found before any model loads, and reported by :func:`proreflow.cli.main` in one line
with exit code 2: argument types that bound numbers (:func:`bounded_int`, :func:`finite_float`),
and checks of devices, files and output folders that raise :class:`UsageError`.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path


def one_line(text: object) -> str:
    """``text`` with its line breaks and runs of spaces collapsed."""
    return " ".join(str(text).split())


class Failure(RuntimeError):
    """An environment or run-time failure that is not the input's fault (an unreachable hub, a full disk):
    one line on stderr and exit code 1."""


class UsageError(ValueError):
    """Bad input to a command; the message names it and the fix (exit code 2, no traceback)."""


def bounded_int(low: int, high: int):
    """An argparse type: an integer in ``[low, high]`` (the bound named in the error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            bound = f"at least {low}" if value < low else f"at most {high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    parse.__name__ = "integer"
    return parse


def finite_float(low: float = 0.0, high: float = math.inf):
    """An argparse type: a finite number in ``[low, high]``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not low <= value <= high:
            bound = f"at least {low:g}" if value < low else f"at most {high:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def check_device(text: str, option: str = "--device") -> str:
    """``text`` if it names a device this machine has (cpu, cuda, cuda:N, mps), else a UsageError."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise UsageError(f"{option}: {text!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"{option}: {text!r}, but this machine has no CUDA device; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(f"{option}: {text!r}, but this machine has {count} CUDA device(s) "
                             f"(cuda:0..cuda:{count - 1})")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UsageError(f"{option}: {text!r}, but MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise UsageError(f"{option}: {text!r} is not supported; use cpu, cuda, cuda:N or mps")
    return text


def writable_dir(path: str | os.PathLike, option: str = "--out", create: bool = False) -> Path:
    """``path`` if it is a folder this process can write in, or one it can make (made with ``create``);
    else a UsageError. Nothing is written when ``create`` is False."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option}: {path} is a file, not a folder; give a folder")
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option}: cannot make {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option}: cannot write in {parent}; give a writable folder")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as err:
            raise UsageError(f"{option}: cannot write in {path} ({err.strerror or err}); give a writable "
                             "folder") from None
    return path


def existing_file(path: str | os.PathLike, option: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"{option}: {path} {'is a folder, not a file' if path.is_dir() else 'does not exist'}")
    return path


def existing_dir(path: str | os.PathLike, option: str, what: str = "folder") -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UsageError(f"{option}: {path} {'is a file, not a ' + what if path.exists() else 'does not exist'}")
    return path
