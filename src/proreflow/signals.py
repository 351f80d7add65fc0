"""Stop signals: Ctrl-C (SIGINT) and what schedulers, ``docker stop``, preemptible machines (SIGTERM) and a
closed terminal (SIGHUP) send (unless ``nohup`` ignores SIGHUP: then it stays ignored). Every command stops
on each of them as Python stops on Ctrl-C: an exception
(:class:`Stopped`, a KeyboardInterrupt) unwinds the command, so its cleanups run (temporary folders go, no file
is left half-written), and the process exits with the shell's code of the signal, 128 + its number. Training
replaces this with a stop at the next step boundary and a checkpoint (``training.progressive``)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
"""The signals that stop a command (a run: at the next step boundary, with a checkpoint)."""


def exit_code(signum: int) -> int:
    """The exit code of a process stopped by signal ``signum``: 128 + its number, as the shell reports one."""
    return 128 + int(signum)


class Stopped(KeyboardInterrupt):
    """A stop signal ``signum`` ended a command. A KeyboardInterrupt, so that code catching Exception lets
    it through."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """The shell's code of a process ended by the signal: 128 + its number (SIGINT 130, SIGTERM 143)."""
        return exit_code(self.signum)


def _raise_stopped(signum, frame) -> None:
    raise Stopped(f"stopped by {signal.Signals(signum).name}", signum)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While active (main thread only), SIGTERM and SIGHUP raise :class:`Stopped` as Ctrl-C raises
    KeyboardInterrupt, instead of ending the process on the spot; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_stopped) for signum in handled() if signum != signal.SIGINT}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def handled() -> tuple[int, ...]:
    """The stop signals to handle now: all of them but a SIGHUP that this process inherited ignored (``nohup``
    ignores it so that a run outlives its terminal; proreflow keeps that promise)."""
    return tuple(s for s in STOP_SIGNALS if not (s == getattr(signal, "SIGHUP", None)
                                                 and signal.getsignal(s) == signal.SIG_IGN))


def ignore_stop_signals() -> None:
    """Ignore further stop signals (while a stopped command prints its last line; main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
