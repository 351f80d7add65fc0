"""Command line: ``proreflow demo | teacher | train | sample | eval | export``.

Each subcommand lives in ``proreflow.commands.<name>`` with ``add_arguments(parser)`` and
``run(args) -> int``; they are imported only when used, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import re
import sys
import warnings

from .commands import one_line
from .signals import ignore_stop_signals, stop_signals_raise

COMMANDS = {
    "demo": "Train (or reuse) a teacher on built-in data, distill it with ProReflow, write a report.",
    "teacher": "Train an epsilon-prediction DDPM teacher on a built-in dataset.",
    "train": "Run a distillation recipe from a YAML config (key=value overrides).",
    "sample": "Sample images from a trained student or an exported pipeline.",
    "eval": "Evaluate a student against its teacher (FID / FD, CLIP score, fidelity).",
    "export": "Export a trained student as a diffusers pipeline folder or LoRA weights.",
}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="proreflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if load in (name, "*"):
            _module(name).add_arguments(p)
    return parser


def _module(name: str):
    return importlib.import_module(f"proreflow.commands.{name}")


KNOWN_NOISE = {
    "diffusers.models.modeling_utils": "should be kept in float32: []",
    "transformers.utils.import_utils": "requires torchvision (not installed)",
}
"""Library warnings that say nothing to a proreflow user, by logger: diffusers warns on every ``.to(dtype)``
of a model even when it keeps no module in float32 (the list it names is empty), and transformers on
import about image processors without torchvision, which no proreflow command uses."""


def _drop_known_noise(record: logging.LogRecord) -> bool:
    return KNOWN_NOISE.get(record.name, "\0") not in record.getMessage()


KNOWN_WARNINGS = ("The `local_dir_use_symlinks` argument is deprecated",)
"""Python warnings of the libraries that say nothing to a proreflow user: huggingface_hub's about an argument
diffusers passes when it looks a model up on the hub."""


def silence_known_noise() -> None:
    """Filter :data:`KNOWN_NOISE` out of its loggers (once; other warnings of those loggers stay), and ignore
    :data:`KNOWN_WARNINGS`."""
    for text in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(text))
    for name in KNOWN_NOISE:
        log = logging.getLogger(name)
        if _drop_known_noise not in log.filters:
            log.addFilter(_drop_known_noise)


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that a command's ``KEY=VALUE`` overrides may stand anywhere among
    its options, in several groups (argparse alone takes only the first group of positionals); they keep
    their order."""
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *(word for word in extra if OVERRIDE.match(word))]
        extra = [word for word in extra if not OVERRIDE.match(word)]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}
"""OS errors that are the machine's (a full disk, a quota, a file-size limit, a failing device): exit code 1."""


def os_errno(err: Exception) -> int | None:
    """The OS error number of ``err``: an OSError's, or the one safetensors writes into its message
    ("I/O error: File too large (os error 27)") when writing a file fails."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    found = re.search(r"\(os error (\d+)\)", str(err))
    return int(found[1]) if found else None


OVERRIDE = re.compile(r"[^-=][^=]*=")
"""A ``KEY=VALUE`` override word."""


def main(argv: list[str] | None = None) -> int:
    """Run a command; bad input (ValueError, OSError) is one line on stderr and exit code 2; a damaged
    run folder, a run stopped by non-finite losses or the environment (a full disk, an unreachable hub) one line
    and exit code 1; a stop signal (Ctrl-C,
    SIGTERM, SIGHUP: :mod:`proreflow.signals`) one line and 128 + its number (130, 143, 129).

    Commands report their own run-time failures (exit code 1); anything else is a bug and keeps its
    traceback.
    """
    argv = sys.argv[1:] if argv is None else argv
    silence_known_noise()
    name = next((a for a in argv if not a.startswith("-")), None)
    if name is None:
        if argv in ([], ["-h"], ["--help"]):
            build_parser().print_help()
            return 0
        print(f"proreflow: error: no command in {' '.join(argv)!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if name not in COMMANDS:
        print(f"proreflow: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    with stop_signals_raise():  # from here on, loading torch and the models included
        try:
            return _run(name, argv)
        except KeyboardInterrupt as err:  # TrainingInterrupted says where the run stopped, and by which signal
            ignore_stop_signals()  # a second signal now would only cut this line short
            say(f"proreflow {name}: {one_line(err) or 'interrupted'}")
            return int(getattr(err, "exit_code", 130))


def end_progress_bars() -> None:
    """Close the progress bars a stopped or failing command left open, so that its one-line message starts a
    line of its own: a bar's line ends only when the bar closes, and a bar whose frame an exception still holds
    (or one a signal cut off while it was being made) has not closed yet."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):  # tqdm's registry of open bars (tqdm.write clears and redraws the same)
        bar.close()


def say(line: str) -> None:
    """A stopped or failing command's one line on stderr, after the progress bars it left open."""
    end_progress_bars()
    print(line, file=sys.stderr)


def _run(name: str, argv: list[str]) -> int:
    """Import, parse and run command ``name``; its failures as :func:`main` says."""
    try:
        _module(name)
    except ModuleNotFoundError as err:
        if err.name == f"proreflow.commands.{name}":
            print(f"proreflow {name}: not available in this version", file=sys.stderr)
            return 2
        raise
    from safetensors import SafetensorError

    from .commands import Failure
    from .training.checkpoint import CheckpointError
    from .training.step import NonFiniteLossError

    try:
        return int(_module(name).run(parse(build_parser(load=name), argv)) or 0)
    except (NonFiniteLossError, CheckpointError, Failure) as err:  # run-time or environment, not bad input
        say(f"proreflow {name}: {one_line(err)}")
        return 1
    except (OSError, SafetensorError) as err:  # a full or failing disk is the environment's; else a bad path
        if os_errno(err) in ENVIRONMENT_ERRNOS:
            say(f"proreflow {name}: {one_line(err)} (nothing half-written is kept; free space and run again)")
            return 1
        say(f"proreflow {name}: error: {one_line(err)}")
        return 2
    except ValueError as err:  # bad input: the message names it and the fix
        say(f"proreflow {name}: error: {one_line(err)}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
