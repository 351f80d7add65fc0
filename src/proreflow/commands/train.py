"""``proreflow train``: run a distillation recipe from a YAML config (or a preset name)."""

from __future__ import annotations

import argparse
import sys

import yaml

from ..training.recipes import PRESETS, Recipe, RecipeError, describe_keys, read_config

USAGE_NOTES = """\
config: a YAML file holding a recipe and a `setup:` section naming what to distill, e.g.

  setup: {{name: digits}}          # a named setup (commands/named_setups.py), or package.module:function; other keys
                                 # are passed to it as keyword arguments
  name: my-run
  defaults: {{lr: 1.0e-4, batch_size: 64}}
  stages:
    - {{windows: 8, steps: 1000}}
    - {{windows: 4, steps: 1000, teacher: previous}}

or a preset name ({presets}) with setup.name=... given as an override.

overrides (KEY=VALUE, the value read as YAML; give them together, e.g. after all options):
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
                        help="continue from the latest checkpoint in --out (starts fresh when there is none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or stage summaries")
    parser.add_argument("--print-config", action="store_true",
                        help="print the checked recipe (every stage spelled out) and exit without training")


def run(args: argparse.Namespace) -> int:
    try:
        raw = read_config(args.config, args.overrides)
        setup_spec = raw.pop("setup", None)
        recipe = Recipe.from_dict(raw)
    except RecipeError as err:
        print(f"proreflow train: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(recipe.to_yaml(), end="")
        if setup_spec is not None:
            print(yaml.safe_dump({"setup": setup_spec}, sort_keys=False), end="")
        return 0
    if not isinstance(setup_spec, dict):
        print("proreflow train: error: the config has no setup section; add `setup: {name: digits}` to it "
              "or pass setup.name=digits", file=sys.stderr)
        return 2

    from ..training import NonFiniteLossError, train
    from .named_setups import build_setup

    try:
        setup = build_setup(setup_spec)
    except ValueError as err:
        print(f"proreflow train: error: {err}", file=sys.stderr)
        return 2
    out = args.out or f"runs/{recipe.name}"
    try:
        result = train(recipe, setup, out, resume=args.resume, progress=not args.no_progress)
    except (NonFiniteLossError, FileExistsError) as err:
        print(f"proreflow train: {err}", file=sys.stderr)
        return 1
    guidance = f", guidance {result.guidance:g}" if result.guidance != 1.0 else ""
    print(f"student: {out}/student.safetensors ({result.windows.count} windows: sample with "
          f"{result.windows.count} steps{guidance})")
    return 0
