"""Command line: ``proreflow demo | teacher | train | sample | eval | export``.

Each subcommand lives in ``proreflow.commands.<name>`` with ``add_arguments(parser)`` and
``run(args) -> int``; they are imported only when used, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": "Train (or reuse) a teacher on built-in data, distill it with ProReflow, write a report.",
    "teacher": "Train an epsilon-prediction DDPM teacher on a built-in dataset.",
    "train": "Run a distillation recipe from a YAML config (key=value overrides).",
    "sample": "Sample images from a trained student or an exported pipeline.",
    "eval": "Evaluate a student against its teacher (FID / FD, CLIP score, fidelity).",
    "export": "Export a trained student as a diffusers pipeline folder or LoRA weights.",
}


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proreflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if load in (name, "*"):
            _module(name).add_arguments(p)
    return parser


def _module(name: str):
    return importlib.import_module(f"proreflow.commands.{name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = next((a for a in argv if not a.startswith("-")), None)
    if name not in COMMANDS:
        build_parser().print_help()
        return 0 if name is None else 2
    args = build_parser(load=name).parse_args(argv)
    return int(_module(name).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
