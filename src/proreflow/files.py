"""Atomic files: the one way the package writes a file or folder that a later run reads.

A file is written under a temporary name beside its final one (``.NAME.tmp-PID``) and renamed
into place with ``os.replace``, which is atomic on POSIX and Windows: a reader, or a run resumed
after a kill at any moment, sees the old file or the new one, never half of one. A temporary
file left by a killed writer is removed by the next write of the same name (same PID) or never
read (its name starts with a dot). Folders are built under a temporary name and moved with
:func:`replace_dir`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder ``tmp`` to ``final``, replacing an older ``final``."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
