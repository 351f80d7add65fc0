"""Atomic files: the one way the package writes a file or folder that a later run reads.

A file is written under a temporary name beside its final one (``.NAME.tmp-PID``,
:func:`temporary_path`) and renamed into place with ``os.replace``, which is atomic on POSIX and
Windows: a reader, or a run resumed after a kill at any moment, sees the old file or the new one,
never half of one. Temporary names hold the writer's process id, so two processes never share
one; a temporary never is read (its name starts with a dot), and those a killed writer left in a
run folder are removed at the next start of a run there (:func:`remove_temporaries`). Folders are
built under a temporary name and moved with :func:`replace_dir`. One process at a time writes in a
run folder: :func:`folder_lock`.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not guarded there
    fcntl = None

TEMPORARY = re.compile(r"\..+\.(?:tmp|old)(?:-\d+)?")
"""The names of temporary files and folders (``.NAME.tmp-PID``, ``.NAME.old-PID``; without the PID from
earlier versions)."""
LOCK_FILE = ".lock"
"""The lock file of a run folder (it holds the writer's pid and host name)."""


def temporary_path(path: str | os.PathLike, kind: str = "tmp", tag: int | str | None = None) -> Path:
    """The temporary name beside ``path``: ``.NAME.<kind>-<tag>``, ``tag`` this process's id by default
    (the same for every process of a multi-process run when they write into one temporary folder)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid() if tag is None else tag}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it to ``path``."""
    path = Path(path)
    tmp = temporary_path(path)
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
    old = temporary_path(final, "old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def remove_temporaries(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files and folders (:data:`TEMPORARY`) under ``folder``, those a killed writer
    left; their paths relative to ``folder``. Call it only while holding :func:`folder_lock`: then no
    other process is writing them."""
    folder, removed = Path(folder), []
    for root, dirs, files in os.walk(folder):
        for name in [d for d in dirs if TEMPORARY.fullmatch(d)]:
            shutil.rmtree(Path(root) / name, ignore_errors=True)
            dirs.remove(name)
            removed.append(str((Path(root) / name).relative_to(folder)))
        for name in files:
            if TEMPORARY.fullmatch(name):
                (Path(root) / name).unlink(missing_ok=True)
                removed.append(str((Path(root) / name).relative_to(folder)))
    return sorted(removed)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` (``.NAME.tmp-PID`` beside it, files or folders) whose writer is
    no longer running, those a killed writer left; the removed paths. A temporary of a live process, or one
    without a process id, is left alone: it may be being written."""
    path, removed = Path(path), []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:tmp|old)-(\d+)")
    for sibling in path.parent.glob(f".{glob.escape(path.name)}.*"):
        match = pattern.fullmatch(sibling.name)
        if match and not process_alive(int(match[1])):
            shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)
            removed.append(sibling)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (one of another user counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no such pid at all)
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


class FolderInUse(ValueError):
    """Another process holds a run folder's lock (:func:`folder_lock`)."""


_HELD: dict[Path, list] = {}  # resolved folder -> [file descriptor or None, holders in this process]


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, option: str = "--out") -> Iterator[None]:
    """Hold ``folder``'s lock: one writer per run folder. Raises :class:`FolderInUse` naming the folder and
    the other writer's pid when another process holds it.

    The lock is ``fcntl.flock`` on ``FOLDER/.lock`` (made if absent, with the holder's pid and host name):
    the system releases it when its process ends, however it ends, so a lock left by a dead process never
    blocks a run. Reentrant within a process (the command line takes it before the checks of the folder,
    :func:`~proreflow.training.train` again). Not enforced where the system has no ``flock`` (Windows, some
    network file systems).
    """
    key = Path(folder).resolve()
    if key not in _HELD:
        _HELD[key] = [_acquire(key, option), 0]
    _HELD[key][1] += 1
    try:
        yield
    finally:
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            _release(_HELD.pop(key)[0])


def _acquire(folder: Path, option: str) -> int | None:
    if fcntl is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").split()
        os.close(fd)
        who = f"pid {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "another process"
        raise FolderInUse(f"{option}: {folder} is in use by another run ({who}, lock {path}); wait for it to end "
                          f"or give another {option}") from None
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return None  # a file system without locks: not guarded
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return fd


def _release(fd: int | None) -> None:
    if fd is None:
        return
    os.ftruncate(fd, 0)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
