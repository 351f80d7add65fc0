"""``proreflow train``: run a distillation recipe from a YAML config (or a preset name)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys

import yaml

from ..signals import exit_code, ignore_stop_signals
from ..training.recipes import PRESETS, Recipe, RecipeError, describe_keys, read_config
from . import UsageError, one_line, writable_dir

USAGE_NOTES = """\
config: a YAML file holding a recipe and a `setup:` section naming what to distill, e.g.

  setup: {{name: digits}}          # a named setup (commands/named_setups.py), or package.module:function (runs
                                 # that code: only with --trust-setup-code); other keys are passed to it as
                                 # keyword arguments
  name: my-run
  defaults: {{lr: 1.0e-4, batch_size: 64}}
  stages:
    - {{windows: 8, steps: 1000}}
    - {{windows: 4, steps: 1000, teacher: previous}}

or a preset name ({presets}) with setup.name=... given as an override.

overrides (KEY=VALUE, the value read as YAML; anywhere among the options, applied in their order):
  seed=3                  a recipe key
  stages.1.lr=5e-5        one stage (0-based)
  stages.*.lr=5e-5        every stage
  defaults.lr=5e-5        stages that do not set lr themselves
  setup.name=digits       the setup section

presets:
{preset_lines}

{keys}
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    preset_lines = "\n".join(f"  {name:<17}{spec['description']}" for name, spec in PRESETS.items())
    parser.epilog = USAGE_NOTES.format(presets=", ".join(PRESETS), preset_lines=preset_lines, keys=describe_keys())
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="YAML config (recipe + setup section) or a preset name")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of config keys (see below)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output folder for checkpoints, stage results and the student (default: runs/NAME)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in --out (starts fresh when there is none)")
    parser.add_argument("--resume-from", metavar="CHECKPOINT", default=None,
                        help="continue from this checkpoint of --out: its name (step-00000500), its global step "
                             "(500) or its folder; the checkpoints after it are deleted (implies --resume)")
    parser.add_argument("--allow-recipe-change", action="store_true",
                        help="with --resume: go on with changed values of keys that change the weights (lr, seed, "
                             "...) or another setup (family, setup keys, teacher, data); without it such a change "
                             "is an error")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars: plain log lines on stdout instead (every log_every steps, messages, "
                             "warnings, stage summaries), as in OUT/train.log")
    parser.add_argument("--trust-setup-code", action="store_true",
                        help="allow setup.name to be an import path (package.module:function): the config then "
                             "runs that code, so give it only for configs you trust (or set "
                             "PROREFLOW_TRUST_SETUP_CODE=1); the named setups need no flag")
    parser.add_argument("--print-config", action="store_true",
                        help="print the checked recipe (every stage spelled out) and exit without training")


def run(args: argparse.Namespace) -> int:
    from .named_setups import check_setup_spec

    check_paths_given(args)
    try:
        raw = read_config(args.config, args.overrides)
        setup_spec = raw.pop("setup", None)
        recipe = Recipe.from_dict(raw)
    except RecipeError as err:
        print(f"proreflow train: error: {err}", file=sys.stderr)
        return 2
    if setup_spec is None:
        print("proreflow train: error: the config has no setup section; add `setup: {name: digits}` to it "
              "or pass setup.name=digits", file=sys.stderr)
        return 2
    check_setup_spec(setup_spec, args.trust_setup_code)  # names, keys, trust; nothing built (ValueError: exit 2)
    if args.print_config:
        print(recipe.to_yaml(), end="")
        print(yaml.safe_dump({"setup": setup_spec}, sort_keys=False), end="")
        return 0

    from ..training.environment import check_environment
    from ..training.progressive import foreign_entries

    check_environment(recipe)  # trackers and optimiser packages (ValueError: exit 2)
    out = writable_dir(args.out or f"runs/{recipe.name}", create=True)
    foreign = foreign_entries(out, (recipe.target_cache, setup_spec.get("cache_dir")))
    if foreign:  # a run writes checkpoints/, stage-*/, student.* ... among them: never mix the two (nor lock)
        raise UsageError(f"--out {out} holds files that are not a run's ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}): choose a new or empty folder")
    with _writer_lock(out):  # before the folder's checks: another run may be writing there (exit 2)
        return _train(args, recipe, setup_spec, out)


def check_paths_given(args: argparse.Namespace) -> None:
    """An empty ``--out`` or ``--resume-from`` is a UsageError (it would mean the current folder, or a fresh
    start): give a path, or leave the option out."""
    if args.out is not None and not args.out.strip():
        raise UsageError("--out: an empty path; give a folder, or leave --out out for runs/NAME (the recipe's name)")
    if args.resume_from is not None and not args.resume_from.strip():
        raise UsageError("--resume-from: an empty checkpoint name; give one (step-00000500, a global step such as "
                         "500, or its folder), or use --resume for the newest")


def _writer_lock(out):
    """The output folder's lock (:func:`~proreflow.files.folder_lock`), taken by the launch's main process
    (``RANK`` 0, or no ``RANK``: one process); the others write nothing there."""
    from ..files import folder_lock

    return folder_lock(out) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()


def _train(args: argparse.Namespace, recipe: Recipe, setup_spec: dict, out) -> int:
    """Check the output folder, build the setup and train (holding the folder's lock)."""
    from ..training import train
    from ..training.checkpoint import CheckpointError, DamagedCheckpointError, latest_checkpoint
    from ..training.progressive import TrainingInterrupted, check_output_folder, finished_line, is_finished
    from ..training.setup import setup_identity
    from .named_setups import build_setup, builder_defaults, check_setup_spec

    resume = args.resume_from or args.resume
    try:  # the output folder (and the setup section of its run) is checked before any model loads
        found = check_output_folder(recipe, out, resume, args.allow_recipe_change,
                                    identity=setup_identity(setup_spec, {}, builder_defaults(
                                        check_setup_spec(setup_spec, args.trust_setup_code))))
    except DamagedCheckpointError as err:  # the run's files are damaged: a run-time failure, not bad input
        print(f"proreflow train: {one_line(err)}", file=sys.stderr)
        return 1
    except CheckpointError as err:  # a checkpoint named that the run does not hold
        print(f"proreflow train: error: {one_line(err)}", file=sys.stderr)
        return 2
    if found is not None and is_finished(recipe, found.meta):  # nothing to train: no setup is built
        print(finished_line(recipe, out))
        return 0
    resume_command = _resume_command(args, out)
    try:
        setup = build_setup(setup_spec, args.trust_setup_code)
        with _log_lines(args.no_progress):
            result = train(recipe, setup, out, resume=resume, progress=not args.no_progress,
                           allow_recipe_change=args.allow_recipe_change)
    except TrainingInterrupted as err:  # exit code 128 + the signal's number
        ignore_stop_signals()
        print(f"proreflow train: {err}; continue with: {resume_command}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:  # a stop signal outside the steps (e.g. while the setup is built)
        ignore_stop_signals()
        newest = latest_checkpoint(out)
        print(f"proreflow train: {one_line(err) or 'interrupted'}; newest checkpoint: "
              f"{newest or 'none'}; continue with: {resume_command}", file=sys.stderr)
        return int(getattr(err, "exit_code", exit_code(signal.SIGINT)))
    guidance = f", guidance {result.guidance:g}" if result.guidance != 1.0 else ""
    print(f"student: {out}/student.safetensors ({result.windows.count} windows: sample with "
          f"{result.windows.count} steps{guidance})")
    return 0


@contextlib.contextmanager
def _log_lines(enabled: bool):
    """With ``enabled`` (--no-progress), what the run logs (``proreflow`` loggers, INFO and up) on stdout."""
    if not enabled:
        yield
        return
    package = logging.getLogger("proreflow")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    previous = package.level
    package.addHandler(handler)
    if package.getEffectiveLevel() > logging.INFO:
        package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(previous)


def _resume_command(args: argparse.Namespace, out) -> str:
    """The command line that continues this run."""
    words = ["proreflow", "train", "--config", args.config, "--out", str(out), "--resume"]
    words += ["--allow-recipe-change"] if args.allow_recipe_change else []
    words += ["--trust-setup-code"] if args.trust_setup_code else []
    words += ["--no-progress"] if args.no_progress else []
    return shlex.join(words + list(args.overrides))
