"""Bad input through the real command line: every case exits with code 2 and exactly one line on
stderr (no traceback), fails before any model loads, and does not hang (an alarm guards each)."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import signal
import subprocess
import sys

import pytest
import yaml
from helpers.engine_toys import tiny_recipe

from proreflow.cli import main

HANG_LIMIT_S = 60
"""A case still running after this long counts as a hang (a guard, not a speed test)."""

TOY = {"setup": {"name": "helpers.engine_toys:make_setup"}, **tiny_recipe()}
UNCONDITIONAL = {"setup": {"name": "helpers.engine_toys:make_setup", "conditional": False}, **tiny_recipe()}

YAML_FILES = {  # name: text of a config that must be refused
    "unclosed_flow": "stages: [\n  {windows: 4\n",
    "mapping_in_scalar": "name: a: b\n",
    "tab_indent": "name: x\n\tseed: 1\n",
    "a_list": "- 1\n- 2\n",
    "a_string": "just a string\n",
    "undefined_alias": "name: *nothing\n",
    "python_tag": "name: !!python/object/apply:os.system ['true']\n",
    "bad_indent": "stages:\n  - windows: 4\n   steps: 3\n",
    "unclosed_quote": "name: 'abc\n",
    "lone_colon_key": ": 3\n",
}

LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
YAML_REFUSED = {  # name: (text of a config that parses but must be refused, part of the one error line)
    "duplicate_seed": ("seed: 1\nname: x\nseed: 2\n", "duplicate_seed.yaml:3:1: duplicate key 'seed' (also on line 1)"),
    "duplicate_stages": ("stages: [{windows: 4}]\nname: x\nstages: [{windows: 2}]\n", "duplicate key 'stages'"),
    "duplicate_setup": ("setup: {name: digits}\nsetup: {name: moons}\n", "duplicate_setup.yaml:2:1: duplicate key"),
    "duplicate_stage_key": ("stages:\n  - windows: 4\n    windows: 2\n", "3:5: duplicate key 'windows'"),
    "deep_flow": ("name: " + "[" * 3000 + "]" * 3000 + "\n", "nested deeper than 32 levels"),
    "deep_block": ("".join("  " * i + f"k{i}:\n" for i in range(60)) + "  " * 60 + "v: 1\n",
                   "nested deeper than 32 levels"),
    "billion_laughs": (LAUGHS, "alias *a: a config may not use aliases"),
    "merge_key": ("base: &b {lr: 1.0e-3}\ndefaults: {<<: *b}\n", "alias *b: a config may not use aliases"),
}

TRAIN = [  # (id, arguments after `train --config CFG`, a part of the one error line)
    ("unknown_key", ["foo=1"], "unknown key 'foo'"),
    ("stage_key_at_top", ["lr=1e-4"], "'lr' is a stage key"),
    ("unknown_stage_key", ["stages.0.foo=1"], "unknown key stages.0.'foo'"),
    ("unknown_default_key", ["defaults.foo=1"], "defaults.'foo'"),
    ("windows_cannot_follow", ["stages.0.windows=3"], "2 windows cannot follow 3"),
    ("windows_zero", ["stages.0.windows=0"], "stages.0.windows: must be at least 1"),
    ("stages_too_many", ["stages=[" + ", ".join(["{{windows: 1}}"] * 65) + "]"], "stages: 65 stages; a recipe has at "
     "most 64"),
    ("windows_huge", ["stages.*.windows=100000"], "stages.0.windows: must be at most 1024"),
    ("steps_zero", ["stages.0.steps=0"], "stages.0.steps: must be at least 1"),
    ("steps_huge", ["stages.0.steps=1000000000000"], "stages.0.steps: must be at most"),
    ("lr_inf", ["stages.*.lr=.inf"], "stages.0.lr: must be a finite number"),
    ("lr_1e400", ["stages.*.lr=1e400"], "stages.0.lr: must be a finite number"),
    ("lr_negative", ["stages.*.lr=-1"], "stages.0.lr: must be at least 0"),
    ("lr_nan", ["stages.*.lr=.nan"], "stages.0.lr: must be a finite number"),
    ("lr_word", ["stages.*.lr=abc"], "stages.0.lr: expected a number"),
    ("lr_absurd", ["stages.*.lr=1000"], "stages.0.lr: must be at most 1"),
    ("lr_list", ["stages.*.lr=[1, 2]"], "stages.0.lr: expected a number"),
    ("wd_inf", ["stages.*.weight_decay=.inf"], "weight_decay: must be a finite number"),
    ("wd_negative", ["stages.*.weight_decay=-0.1"], "weight_decay: must be at least 0"),
    ("wd_absurd", ["defaults.weight_decay=50"], "weight_decay: must be at most 1"),
    ("alpha_inf", ["stages.*.alpha=.inf"], "alpha: must be a finite number"),
    ("alpha_negative", ["stages.*.alpha=-1"], "alpha: must be at least 0"),
    ("beta_1e400", ["stages.*.beta=1e400"], "beta: must be a finite number"),
    ("beta_huge", ["stages.*.beta=1e9"], "beta: must be at most 1000"),
    ("grad_clip_inf", ["stages.*.grad_clip=.inf"], "grad_clip: must be a finite number"),
    ("ema_one", ["stages.*.ema_decay=1"], "ema_decay: must be in [0, 1)"),
    ("ema_negative", ["stages.*.ema_decay=-0.5"], "ema_decay: must be in [0, 1)"),
    ("dropout_above_one", ["stages.*.cond_dropout=1.5"], "cond_dropout: must be in [0, 1)"),
    ("guidance_inf", ["stages.*.guidance=.inf"], "guidance: must be a finite number"),
    ("guidance_huge", ["stages.*.guidance=1e9"], "guidance: must be at most 100"),
    ("batch_zero", ["stages.*.batch_size=0"], "batch_size: must be at least 1"),
    ("batch_huge", ["stages.*.batch_size=1000000000"], "batch_size: must be at most 65536"),
    ("batch_vs_accum", ["stages.*.grad_accum=3"], "does not split into 3 accumulation step(s)"),
    ("accum_zero", ["stages.*.grad_accum=0"], "grad_accum: must be at least 1"),
    ("solver_zero", ["stages.0.solver_steps=0"], "solver_steps: must be at least 1"),
    ("solver_huge", ["stages.0.solver_steps=1000000"], "solver_steps: must be at most 1000"),
    ("solver_uneven", ["stages.1.solver_steps=3"], "cannot cross 2 old windows evenly"),
    ("first_teacher_previous", ["stages.0.teacher=previous"], "the first stage has no previous student"),
    ("teacher_bogus", ["stages.0.teacher=bogus"], "'bogus' is not one of original, previous"),
    ("cfg_sync_without_dropout", ["stages.*.guidance_mode=cfg_sync"], "set cond_dropout > 0"),
    ("guidance_mode_bogus", ["stages.*.guidance_mode=nope"], "'nope' is not one of baked, cfg_sync"),
    ("warmup_negative", ["stages.*.warmup_steps=-1"], "warmup_steps: must be at least 0"),
    ("start_share_above_one", ["stages.*.start_share=1.5"], "start_share: must be at most 1"),
    ("start_points_word", ["stages.0.start_points=noise"],
     "stages.0.start_points: 'noise' is not one of data, teacher"),
    ("teacher_start_from_previous", ["stages.*.start_points=teacher"],
     "stages.1.start_points: teacher start points lie on the original teacher's trajectory"),
    ("teacher_start_multistep", ["stages.0.start_points=teacher", "stages.0.solver=dpmpp_2m"],
     "stages.0.solver: DPM-Solver++(2M) carries history across window edges"),
    ("teacher_start_dropout", ["stages.0.start_points=teacher", "stages.0.cond_dropout=0.1"],
     "stages.0.cond_dropout: teacher start points follow each item's conditioned trajectory"),
    ("c_cap_zero", ["stages.*.c_cap=0"], "c_cap: must be > 0"),
    ("seed_negative", ["seed=-1"], "seed: must be at least 0"),
    ("seed_float", ["seed=1.5"], "seed: expected an integer"),
    ("seed_huge", ["seed=100000000000000000000000000000000"], "seed: must be at most"),
    ("mixed_precision_bogus", ["mixed_precision=fp8"], "'fp8' is not one of no, fp16, bf16"),
    ("from_scratch_word", ["from_scratch=maybe"], "from_scratch: expected true or false"),
    ("checkpoint_every_negative", ["checkpoint_every=-1"], "checkpoint_every: must be at least 0"),
    ("keep_negative", ["keep_checkpoints=-3"], "keep_checkpoints: must be at least 0"),
    ("max_nonfinite_zero", ["max_nonfinite=0"], "max_nonfinite: must be at least 1"),
    ("log_every_zero", ["log_every=0"], "log_every: must be at least 1"),
    ("workers_huge", ["num_workers=100000"], "num_workers: must be at most 256"),
    ("name_path", ["name=../../evil"], "is not a folder name"),
    ("name_empty", ["name=''"], "is not a folder name"),
    ("name_number", ["name=2025"], "which YAML read as a number"),
    ("stages_empty", ["stages=[]"], "a recipe needs a non-empty list of stages"),
    ("stages_number", ["stages=5"], "a recipe needs a non-empty list of stages"),
    ("stage_index_out_of_range", ["stages.9.lr=1"], "'9' is not an index of a list of 2"),
    ("override_without_value", ["seed"], "is not key=value"),
    ("override_without_key", ["=3"], "is not key=value"),
    ("override_bad_yaml", ["seed=[1,"], "override seed: cannot read"),
    ("stage_not_mapping", ["stages.0=notamapping"], "a stage must be a mapping"),
    ("defaults_number", ["defaults=5"], "defaults: expected a mapping"),
    ("setup_number", ["setup=5"], "setup: expected a mapping"),
    ("setup_unknown_name", ["setup.name=nope"], "unknown setup 'nope'"),
    ("setup_name_number", ["setup.name=3"], "the setup section needs a name"),
    ("setup_misspelled_key", ["setup.nn=3"], "'helpers.engine_toys:make_setup' takes no key 'nn' (did you mean 'n'?)"),
    ("builtin_misspelled_key", ["setup.name=digits", "setup.stepz=10"], "takes no key 'stepz' (did you mean"),
    ("builtin_teacher_lr_inf", ["setup.name=moons", "setup.lr=.inf"], "setup.lr: must be a finite number"),
    ("builtin_teacher_steps_zero", ["setup.name=moons", "setup.steps=0"], "setup.steps: must be a finite number"),
    ("builtin_teacher_kind_unknown", ["setup.name=moons", "setup.teacher=rectified"],
     "setup.teacher: unknown teacher kind 'rectified'; use one of ddpm, flow"),
    ("sd_misspelled_key", ["setup.name=stable-diffusion", "setup.resolutoin=512", "setup.teacher=x"],
     "takes no key 'resolutoin' (did you mean 'resolution'?)"),
    ("sd_missing_teacher_folder", ["setup.name=stable-diffusion", "setup.teacher={tmp}/nope", "setup.data={tmp}"],
     "does not exist"),
    ("sd_teacher_is_a_file", ["setup.name=stable-diffusion", "setup.teacher={file}", "setup.data={tmp}"],
     "does not exist"),
    ("sd_resolution_absurd", ["setup.name=stable-diffusion", "setup.teacher=x", "setup.data=y",
                              "setup.resolution=100000"], "setup.resolution: must be at most 4096"),
    ("sd_data_and_prompts", ["setup.name=stable-diffusion", "setup.teacher=x"], "give exactly one of data"),
    ("setup_import_missing_attr", ["setup.name=json:nope"], "cannot import 'json:nope'"),
    ("setup_import_missing_module", ["setup.name=no_such_module_xyz:f"], "cannot import"),
    ("from_scratch_without_builder", ["from_scratch=true"], "from_scratch: true needs a setup with make_student"),
    ("student_prediction_of_a_copy", ["student_prediction=velocity"], "'velocity' needs from_scratch"),
    ("student_prediction_bogus", ["student_prediction=noise"], "'noise' is not one of auto, teacher, epsilon"),
    ("out_is_a_file", ["--out", "{file}"], "is a file, not a folder"),
    ("out_unwritable", ["--out", "/proc/proreflow-out"], "--out: cannot"),
    ("out_holds_a_run", ["--out", "{run}"], "already holds checkpoints"),
    ("resume_changed_lr", ["--out", "{run}", "--resume", "stages.*.lr=0.5"], "stages.0.lr: the checkpoint"),
    ("resume_changed_seed", ["--out", "{run}", "--resume", "seed=7"], "seed: the checkpoint"),
    ("resume_other_stages", ["--out", "{run}", "--resume", "stages.0.windows=8", "stages.1.windows=4"],
     "stages.0.windows: the checkpoint"),
    ("unknown_option", ["--bogus"], "unrecognized arguments: --bogus"),
    # issue 14, items 6-7: the keys of watching a run and of diffusers' training comforts
    ("lr_schedule_bogus", ["stages.*.lr_schedule=cosine_forever"],
     "stages.0.lr_schedule: 'cosine_forever' is not one of constant_with_warmup, constant, linear, cosine"),
    ("lr_schedule_piecewise", ["defaults.lr_schedule=piecewise_constant"], "'piecewise_constant' is not one of"),
    ("lr_schedule_number", ["stages.*.lr_schedule=3"], "lr_schedule: expected one of constant_with_warmup"),
    ("lr_num_cycles_zero", ["stages.*.lr_num_cycles=0"], "stages.0.lr_num_cycles: must be at least 1"),
    ("lr_num_cycles_float", ["stages.*.lr_num_cycles=1.5"], "stages.0.lr_num_cycles: expected an integer"),
    ("lr_power_zero", ["stages.*.lr_power=0"], "stages.0.lr_power: must be at least 0.001"),
    ("lr_power_inf", ["stages.*.lr_power=.inf"], "stages.0.lr_power: must be a finite number"),
    ("polynomial_below_its_end", ["stages.*.lr_schedule=polynomial", "stages.*.lr=1e-8"],
     "stages.0.lr: the polynomial schedule decays to 1e-07"),
    ("adam_beta1_one", ["defaults.adam_beta1=1"], "stages.0.adam_beta1: must be in [0, 1)"),
    ("adam_beta2_negative", ["stages.*.adam_beta2=-0.1"], "stages.0.adam_beta2: must be in [0, 1)"),
    ("adam_epsilon_zero", ["stages.*.adam_epsilon=0"], "stages.0.adam_epsilon: must be at least 1e-30"),
    ("adam_epsilon_huge", ["stages.*.adam_epsilon=5"], "stages.0.adam_epsilon: must be at most 1"),
    ("optimizer_bogus", ["optimizer=sgd"], "optimizer: 'sgd' is not one of adamw, adamw_8bit"),
    ("allow_tf32_word", ["allow_tf32=maybe"], "allow_tf32: expected true or false"),
    ("gradient_checkpointing_word", ["gradient_checkpointing=3"], "gradient_checkpointing: expected true or false"),
    ("gradient_checkpointing_unsupported", ["gradient_checkpointing=true"],
     "gradient_checkpointing: the student network (MLP) has no enable_gradient_checkpointing()"),
    ("setup_gradient_checkpointing_moved", ["setup.gradient_checkpointing=true"],
     "setup.gradient_checkpointing: gradient checkpointing is now the recipe key gradient_checkpointing"),
    ("max_train_samples_zero", ["max_train_samples=0"], "max_train_samples: must be at least 1"),
    ("max_train_samples_float", ["max_train_samples=2.5"], "max_train_samples: expected an integer"),
    ("report_to_bogus", ["report_to=mlflow"], "report_to: 'mlflow' is not one of none, tensorboard, wandb, all"),
    ("report_to_boolean", ["report_to=no"], "report_to: expected one of none, tensorboard, wandb, all"),
    ("tensorboard_word", ["tensorboard=3"], "tensorboard: the key is now report_to"),
    ("tensorboard_renamed", ["tensorboard=true"], "tensorboard: the key is now report_to"),
    ("validation_every_negative", ["validation_every=-2"], "validation_every: must be at least 0"),
    ("validation_samples_zero", ["validation_samples=0"], "validation_samples: must be at least 1"),
    ("validation_samples_huge", ["validation_samples=100000"], "validation_samples: must be at most 1024"),
    ("resume_from_absent", ["--out", "{run}", "--resume-from", "step-00000099"],
     "step-00000099 does not exist; checkpoints in"),
    ("resume_from_elsewhere", ["--out", "{run}", "--resume-from", "{tmp}/step-00000002"], "not a checkpoint of"),
    # issue 27: empty paths, and override values and keys a config may not hold
    ("out_empty", ["--out", ""], "--out: an empty path; give a folder"),
    ("out_blank", ["--out", "  "], "--out: an empty path; give a folder"),
    ("resume_from_empty", ["--resume", "--resume-from", ""], "--resume-from: an empty checkpoint name"),
    ("override_deep_value", ["name=" + "[" * 3000 + "]" * 3000], "nested deeper than 32 levels"),
    ("override_alias", ["stages.*.lr=[&a 1, *a]"], "alias *a: a config may not use aliases"),
    ("override_duplicate_key", ["defaults={{lr: 1.0e-3, lr: 2.0e-3}}"], "duplicate key 'lr' (also on line 1)"),
    ("override_deep_key", [".".join(["a"] * 5000) + "=1"], "5000 dotted parts, at most 32"),
] + [case for case, absent in [
    (("optimizer_8bit_without_bitsandbytes", ["optimizer=adamw_8bit"], "optimizer: 'adamw_8bit' needs bitsandbytes"),
     importlib.util.find_spec("bitsandbytes") is None),
    (("report_to_wandb_without_wandb", ["report_to=wandb"], "report_to: 'wandb' needs the wandb package"),
     importlib.util.find_spec("wandb") is None),
] if absent]  # (these two cases exist where the package is not installed)

TRAIN_OTHER = [  # (id, whole argument list, part of the error)
    ("no_config", ["train"], "the following arguments are required: --config"),
    ("config_missing", ["train", "--config", "{tmp}/missing.yaml"], "is neither a preset"),
    ("config_is_a_folder", ["train", "--config", "{tmp}"], "is neither a preset"),
    ("preset_typo", ["train", "--config", "proreflow-iii"], "is neither a preset"),
    ("config_not_utf8", ["train", "--config", "{not_utf8}"], "cannot read the file"),
    ("config_without_setup", ["train", "--config", "{recipe_only}"], "no setup section"),
    ("print_config_misspelled_setup_key", ["train", "--config", "{cfg}", "--print-config", "setup.nn=3"],
     "takes no key 'nn'"),
    ("guidance_on_unconditional_data", ["train", "--config", "{uncond}", "--out", "{tmp}/u1", "stages.*.guidance=2"],
     "stages.0.guidance: baking guidance 2.0 into the targets needs conditioned data"),
    ("dropout_on_unconditional_data", ["train", "--config", "{uncond}", "--out", "{tmp}/u2",
                                       "stages.*.cond_dropout=0.1"], "stages.0.cond_dropout: condition dropout needs"),
] + [(f"yaml_{name}", ["train", "--config", f"{{yaml_{name}}}"], "YAML syntax error" if name not in (
    "a_list", "a_string") else "a config must be a YAML mapping") for name in YAML_FILES] + [
    (f"yaml_{name}", ["train", "--config", f"{{yaml_{name}}}"], expected)
    for name, (_, expected) in YAML_REFUSED.items()]

DEMO = [
    ("demo_steps_zero", ["--steps", "0"], "--steps: must be at least 1"),
    ("demo_steps_negative", ["--steps", "-5"], "--steps: must be at least 1"),
    ("demo_steps_word", ["--steps", "abc"], "--steps: expected an integer"),
    ("demo_steps_huge", ["--steps", "100000000"], "--steps: must be at most"),
    ("demo_samples_zero", ["--samples", "0"], "--samples: must be at least 2"),
    ("demo_threads_zero", ["--threads", "0"], "--threads: must be at least 1"),
    ("demo_threads_huge", ["--threads", "5000"], "--threads: must be at most 1024"),
    ("demo_data_unknown", ["--data", "nope"], "invalid choice: 'nope'"),
    ("demo_recipe_missing", ["--recipe", "{tmp}/nope.yaml"], "is neither a preset"),
    ("demo_recipe_bad_yaml", ["--recipe", "{yaml_unclosed_flow}"], "YAML syntax error"),
    ("demo_recipe_bad_value", ["--recipe", "{bad_recipe}"], "stages.0.lr: must be a finite number"),
    ("demo_out_is_a_file", ["--out", "{file}"], "is a file, not a folder"),
    ("demo_seed_negative", ["--seed", "-1"], "--seed: must be at least 0"),
    ("demo_cache_dir_is_a_file", ["--cache-dir", "{file}"], "--cache-dir: "),
    ("demo_teacher_steps_zero", ["--teacher-steps", "0"], "--teacher-steps: must be at least 1"),
]

TEACHER = [
    ("teacher_no_data", [], "the following arguments are required: --data"),
    ("teacher_data_unknown", ["--data", "nope"], "invalid choice: 'nope'"),
    ("teacher_steps_zero", ["--data", "moons", "--steps", "0"], "--steps: must be at least 1"),
    ("teacher_kind_unknown", ["--data", "moons", "--teacher", "rectified"], "--teacher: invalid choice: 'rectified'"),
    ("teacher_batch_zero", ["--data", "moons", "--batch-size", "0"], "--batch-size: must be at least 1"),
    ("teacher_batch_huge", ["--data", "moons", "--batch-size", "1000000000"], "--batch-size: must be at most"),
    ("teacher_lr_inf", ["--data", "moons", "--lr", "inf"], "--lr: must be a finite number"),
    ("teacher_lr_nan", ["--data", "moons", "--lr", "nan"], "--lr: must be a finite number"),
    ("teacher_lr_negative", ["--data", "moons", "--lr", "-1"], "--lr: must be at least 0"),
    ("teacher_lr_1e400", ["--data", "moons", "--lr", "1e400"], "--lr: must be a finite number"),
    ("teacher_device_absent", ["--data", "moons", "--device", "cuda:7"], "--device: 'cuda:7'"),
    ("teacher_device_bogus", ["--data", "moons", "--device", "bogus"], "--device: 'bogus' is not a device"),
    ("teacher_samples_one", ["--data", "moons", "--samples", "1"], "--samples: must be at least 2"),
    ("teacher_threads_zero", ["--data", "moons", "--threads", "0"], "--threads: must be at least 1"),
    ("teacher_guidance_inf", ["--data", "moons", "--guidance", "inf"], "--guidance: must be a finite number"),
    ("teacher_cache_dir_is_a_file", ["--data", "moons", "--cache-dir", "{file}"], "--cache-dir: "),
]

SAMPLE = [
    ("sample_no_model", ["--prompt", "a"], "the following arguments are required: --model"),
    ("sample_model_missing", ["--model", "{tmp}/nope", "--prompt", "a"], "does not exist"),
    ("sample_model_is_a_file", ["--model", "{file}", "--prompt", "a"], "does not exist"),
    ("sample_model_not_a_pipeline", ["--model", "{tmp}", "--prompt", "a"], "no model_index.json"),
    ("sample_no_prompt", ["--model", "{tmp}"], "give --prompt TEXT"),
    ("sample_prompts_missing", ["--model", "{tmp}", "--prompts", "{tmp}/nope.txt"], "--prompts: "),
    ("sample_prompts_not_utf8", ["--model", "{tmp}", "--prompts", "{not_utf8}"], "holds no prompts"),
    ("sample_lora_missing", ["--model", "{tmp}", "--prompt", "a", "--lora", "{tmp}/nolora"], "--lora: "),
    ("sample_lora_without_weights", ["--model", "{tmp}", "--prompt", "a", "--lora", "{tmp}"],
     "holds no pytorch_lora_weights.safetensors"),
    ("sample_steps_zero", ["--model", "{tmp}", "--prompt", "a", "--steps", "0"], "--steps: must be at least 1"),
    ("sample_steps_huge", ["--model", "{tmp}", "--prompt", "a", "--steps", "5000"], "--steps: must be at most"),
    ("sample_images_zero", ["--model", "{tmp}", "--prompt", "a", "--num-images", "0"], "--num-images: must be"),
    ("sample_images_huge", ["--model", "{tmp}", "--prompt", "a", "--num-images", "100000"], "--num-images: must"),
    ("sample_height_tiny", ["--model", "{tmp}", "--prompt", "a", "--height", "7"], "--height: must be at least"),
    ("sample_height_huge", ["--model", "{tmp}", "--prompt", "a", "--height", "100000"], "--height: must be at"),
    ("sample_width_odd", ["--model", "{tmp}", "--prompt", "a", "--width", "100"], "--width: 100 is not a multiple"),
    ("sample_guidance_inf", ["--model", "{tmp}", "--prompt", "a", "--guidance", "inf"], "--guidance: must be"),
    ("sample_guidance_negative", ["--model", "{tmp}", "--prompt", "a", "--guidance", "-1"], "--guidance: must"),
    ("sample_device_bogus", ["--model", "{tmp}", "--prompt", "a", "--device", "bogus"], "is not a device"),
    ("sample_device_absent", ["--model", "{tmp}", "--prompt", "a", "--device", "cuda:3"], "--device: 'cuda:3'"),
    ("sample_dtype_bogus", ["--model", "{tmp}", "--prompt", "a", "--dtype", "float8"], "invalid choice"),
    ("sample_windows_zero", ["--model", "{tmp}", "--prompt", "a", "--windows", "0"], "--windows: must be at"),
    ("sample_seed_negative", ["--model", "{tmp}", "--prompt", "a", "--seed", "-1"], "--seed: must be at least"),
]

EVAL = [  # after `eval --teacher {tmp}/t --student {student} --prompts {prompts} --out {tmp}/o`, unless replaced
    ("eval_steps_words", ["--steps", "a,b"], "expected comma-separated step counts"),
    ("eval_steps_zero", ["--steps", "0"], "step counts must be between 1 and 1000"),
    ("eval_steps_huge", ["--steps", "1,5000"], "step counts must be between 1 and 1000"),
    ("eval_num_zero", ["--num", "0"], "--num: must be at least 1"),
    ("eval_teacher_steps_zero", ["--teacher-steps", "0"], "--teacher-steps: must be at least 1"),
    ("eval_teacher_steps_huge", ["--teacher-steps", "100000"], "--teacher-steps: must be at most"),
    ("eval_guidance_nan", ["--guidance", "nan"], "--guidance: must be a finite number"),
    ("eval_student_guidance_inf", ["--student-guidance", "inf"], "--student-guidance: must be a finite"),
    ("eval_resolution_tiny", ["--resolution", "7"], "--resolution: must be at least"),
    ("eval_resolution_huge", ["--resolution", "100000"], "--resolution: must be at most"),
    ("eval_batch_zero", ["--batch-size", "0"], "--batch-size: must be at least 1"),
    ("eval_grid_negative", ["--grid-prompts", "-1"], "--grid-prompts: must be at least 0"),
    ("eval_workers_negative", ["--workers", "-1"], "--workers: must be at least 0"),
    ("eval_device_bogus", ["--device", "bogus"], "is not a device"),
    ("eval_protocol_bogus", ["--protocol", "bogus"], "invalid choice: 'bogus'"),
    ("eval_prompts_missing", ["--prompts", "{tmp}/nope.txt"], "--prompts: "),
    ("eval_student_missing", ["--student", "{tmp}/nope"], "--student: "),
    ("eval_student_is_a_file", ["--student", "{file}"], "--student: "),
    ("eval_teacher_missing", [], "does not exist"),
    ("eval_inception_missing", ["--inception", "{tmp}/nope.pt"], "--inception: "),
    ("eval_student_lora_missing", ["--student-lora", "{tmp}/nope"], "--student-lora: "),
    ("eval_out_is_a_file", ["--out", "{file}"], "is a file, not a folder"),
]

EXPORT = [
    ("export_nothing", [], "the following arguments are required"),
    ("export_run_missing", ["--run", "{tmp}/nope", "--out", "{tmp}/e"], "--run: "),
    ("export_run_is_a_file", ["--run", "{file}", "--out", "{tmp}/e"], "--run: "),
    ("export_run_not_a_run", ["--run", "{tmp}", "--out", "{tmp}/e"], "student.json not found"),
    ("export_student_json_garbage", ["--run", "{garbage_run}", "--out", "{tmp}/e"], "is not valid JSON"),
    ("export_weights_missing", ["--run", "{no_weights_run}", "--out", "{tmp}/e"], "student.safetensors is missing"),
    ("export_rank_zero", ["--run", "{run}", "--out", "{tmp}/e", "--lora-rank", "0"], "--lora-rank: must be at"),
    ("export_rank_huge", ["--run", "{run}", "--out", "{tmp}/e", "--lora-rank", "100000"], "--lora-rank: must"),
    ("export_no_teacher", ["--run", "{run}", "--out", "{tmp}/e"], "the run does not name its teacher"),
    ("export_teacher_missing", ["--run", "{run}", "--out", "{tmp}/e", "--teacher", "{tmp}/nope"], "does not exist"),
    ("export_out_is_a_file", ["--run", "{run}", "--out", "{file}", "--teacher", "x"], "is a file, not a folder"),
    ("export_out_not_empty", ["--run", "{run}", "--out", "{run}", "--teacher", "x"],
     "is not empty and holds no earlier export"),
]

OTHER = [
    ("unknown_command", ["bogus"], "unknown command 'bogus'"),
    ("no_command", ["--bogus"], "no command in"),
]



def _with_out(command: str, case_id: str, args: list[str]) -> list[str]:
    """``args`` with an ``--out`` in the scratch folder unless they name one (nothing is written elsewhere)."""
    return args if "--out" in args else [*args, "--out", f"{{tmp}}/{command}-{case_id}"]


CASES = ([(i, ["train", "--config", "{cfg}", *_with_out("train", i, a)], m) for i, a, m in TRAIN] + TRAIN_OTHER
         + [(i, ["demo", *_with_out("demo", i, a)], m) for i, a, m in DEMO]
         + [(i, ["teacher", *a], m) for i, a, m in TEACHER]
         + [(i, ["sample", *a], m) for i, a, m in SAMPLE] + [(i, ["export", *a], m) for i, a, m in EXPORT] + OTHER)
EVAL_BASE = ["--teacher", "{tmp}/t", "--student", "{student}", "--prompts", "{prompts}", "--out", "{tmp}/o"]


def _eval_args(change: list[str]) -> list[str]:
    args = list(EVAL_BASE)
    for option, value in zip(change[::2], change[1::2]):
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
    return ["eval", *args]


CASES += [(i, _eval_args(a), m) for i, a, m in EVAL]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from proreflow.builtin.teacher import builtin_setup  # noqa: F401  (imported once, outside the alarms)
    from proreflow.training import train

    root = tmp_path_factory.mktemp("bad-input")
    p = {"tmp": root / "scratch", "file": root / "a-file.txt", "cfg": root / "toy.yaml",
         "uncond": root / "uncond.yaml", "not_utf8": root / "not-utf8.txt", "prompts": root / "prompts.txt",
         "student": root / "student", "bad_recipe": root / "bad-recipe.yaml",
         "recipe_only": root / "recipe-only.yaml"}
    p["tmp"].mkdir()
    p["file"].write_text("not a folder\n")
    p["cfg"].write_text(yaml.safe_dump(TOY))
    p["uncond"].write_text(yaml.safe_dump(UNCONDITIONAL))
    p["not_utf8"].write_bytes(b"\xff\xfe\xfa\n")
    p["prompts"].write_text("a cat\n")
    p["student"].mkdir()
    p["bad_recipe"].write_text(yaml.safe_dump({**tiny_recipe(), "defaults": {"lr": float("inf")}}))
    p["recipe_only"].write_text(yaml.safe_dump(tiny_recipe()))
    for name, text in [*YAML_FILES.items(), *((name, text) for name, (text, _) in YAML_REFUSED.items())]:
        p[f"yaml_{name}"] = root / f"{name}.yaml"
        p[f"yaml_{name}"].write_text(text)
    from helpers.engine_toys import make_setup

    p["run"] = root / "run"
    train({**tiny_recipe(), "checkpoint_every": 2, "keep_checkpoints": 0}, make_setup(32), p["run"], progress=False)
    p["damaged"] = root / "damaged"
    shutil.copytree(p["run"], p["damaged"])
    for meta in (p["damaged"] / "checkpoints").glob("step-*/meta.json"):
        meta.write_text("{}")
    p["garbage_run"] = root / "garbage-run"
    p["garbage_run"].mkdir()
    (p["garbage_run"] / "student.json").write_text("{oops")
    p["no_weights_run"] = root / "no-weights-run"
    p["no_weights_run"].mkdir()
    (p["no_weights_run"] / "student.json").write_text(json.dumps({"windows": 2, "info": {}}))
    return {k: str(v) for k, v in p.items()}


NAMED_KEY = re.compile(r"^(--[\w-]+|setup\.[\w.]+|stages\.[\w.*]+|defaults\.[\w.]+|[a-z_]+):")
"""A case whose expected text starts with a key (``stages.0.lr:``, ``--steps:``, ``setup.name:``): the message
must name that key; the rest of the expected text documents the case."""


def _alarm(signum, frame):
    raise TimeoutError(f"no answer within {HANG_LIMIT_S} s: a hang")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_code_2(paths, capsys, caplog, case):
    name, template, expected = case
    argv = [a.format(**paths) for a in template]
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_LIMIT_S)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse --help and the like
        code = exit_.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, f"{name}: exit code {code}, stderr {err!r}"
    assert "Traceback" not in err and len(lines) == 1, f"{name}: stderr is not one line: {err!r}"
    named = NAMED_KEY.match(expected)  # the key the message must name; its wording is free
    if named:
        assert named.group(1) in lines[0], f"{name}: {lines[0]!r} does not name {named.group(1)!r}"
    else:  # no key to name (a path, a file, a combination): the fragment that says what is wrong
        assert expected in lines[0], f"{name}: {lines[0]!r} lacks {expected!r}"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, f"{name}: warnings would add stderr lines: {warnings}"


@pytest.mark.parametrize("args, expected", [
    (["--resume"], "no complete checkpoint left"),
    (["--resume-from", "2"], "step-00000002 is damaged (meta.json"),
])
def test_damaged_checkpoints_are_a_run_time_failure_exit_code_1(paths, capsys, args, expected):
    """Damaged files of a run are not bad input: one line naming what is damaged, exit code 1 (not 2)."""
    code = main(["train", "--config", paths["cfg"], "--out", paths["damaged"], *args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0]


def test_the_table_is_large():
    assert len(CASES) >= 100 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv, expected", [
    (["train", "--config", "{yaml_unclosed_flow}"], "YAML syntax error"),
    (["train", "--config", "{yaml_duplicate_seed}"], "duplicate key 'seed'"),
    (["train", "--config", "{yaml_billion_laughs}"], "a config may not use aliases"),
    (["train", "--config", "{cfg}", "--out", ""], "--out: an empty path"),
    (["demo", "--steps", "0"], "--steps: must be at least 1"),
    (["sample", "--model", "{tmp}/nope", "--prompt", "a"], "does not exist"),
])
def test_bad_input_in_a_subprocess(paths, argv, expected):
    """The installed entry point: one line on stderr, exit code 2 (a few cases; each starts Python)."""
    done = subprocess.run([sys.executable, "-m", "proreflow.cli", *(a.format(**paths) for a in argv)],
                          capture_output=True, text=True, timeout=HANG_LIMIT_S * 2)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert expected in lines[0]


def test_setup_code_runs_only_when_trusted(paths, tmp_path, capsys, monkeypatch):
    """setup.name as an import path is code execution: refused (exit 2, one line naming setup.name and the
    flag, nothing imported) unless --trust-setup-code or PROREFLOW_TRUST_SETUP_CODE=1; the named setups need
    neither."""
    monkeypatch.delenv("PROREFLOW_TRUST_SETUP_CODE")
    (tmp_path / "side_effect_xyz.py").write_text("import pathlib\npathlib.Path(__file__).with_suffix('.ran').touch()\n"
                                                 "def make():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"setup": {"name": "side_effect_xyz:make"}, **tiny_recipe()}))
    for argv in (["--config", str(config), "--out", str(tmp_path / "o")],
                 ["--config", paths["cfg"], "setup.name=os:system", "--print-config"]):
        assert main(["train", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("proreflow train: error: setup.name: '"), lines
        assert "--trust-setup-code (or PROREFLOW_TRUST_SETUP_CODE=1)" in lines[0]
    assert not (tmp_path / "side_effect_xyz.ran").exists()  # not even imported
    assert main(["train", "--config", str(config), "--print-config", "--trust-setup-code"]) == 0
    assert (tmp_path / "side_effect_xyz.ran").exists()
    assert main(["train", "--config", paths["cfg"], "--print-config", "setup.name=moons"]) == 0  # a named setup
    monkeypatch.setenv("PROREFLOW_TRUST_SETUP_CODE", "1")
    assert main(["train", "--config", paths["cfg"], "--print-config"]) == 0


def test_known_library_noise_is_dropped_and_other_warnings_of_its_loggers_are_kept():
    """diffusers' empty 'kept in float32: []' warning on a model's ``.to(dtype)`` is dropped by the CLI's
    filter; the same warning naming a module, and other loggers' warnings, still come through."""
    import torch
    from diffusers import UNet2DConditionModel

    from proreflow.cli import silence_known_noise

    silence_known_noise()
    name = "diffusers.models.modeling_utils"
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger(name).addHandler(handler)
    try:
        unet = UNet2DConditionModel(block_out_channels=(32, 32), layers_per_block=1, cross_attention_dim=8,
                                    attention_head_dim=4, sample_size=8, norm_num_groups=8,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        unet.to(torch.float32)
        assert records == []
        logging.getLogger(name).warning("There are modules in X that should be kept in float32: ['norm'].")
        assert [r.getMessage() for r in records] == ["There are modules in X that should be kept in float32: "
                                                     "['norm']."]
    finally:
        logging.getLogger(name).removeHandler(handler)


def test_a_damaged_demo_run_is_a_run_time_failure_exit_code_1(paths, capsys, tmp_path):
    """``proreflow demo`` resumes its run folders: a damaged one is one line and exit code 1, as in train."""
    shutil.copytree(paths["damaged"], tmp_path / "demo" / "moons" / "run")
    code = main(["demo", "--data", "moons", "--out", str(tmp_path / "demo"), "--no-progress"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("proreflow demo: ") and "no complete checkpoint left" in lines[0]


def test_overrides_may_stand_anywhere_among_the_options(paths, capsys):
    """KEY=VALUE words in several groups between options are all overrides, applied in their order; a word
    that is neither an option nor an override is still one line naming it."""
    assert main(["train", "--config", paths["cfg"], "seed=3", "--print-config", "name=x", "seed=5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed"] == 5 and printed["name"] == "x"
    with pytest.raises(SystemExit) as stop:  # argparse's own exit
        main(["train", "--config", paths["cfg"], "seed=3", "--print-config", "stray"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "proreflow: error: unrecognized arguments: stray (see proreflow --help)"]
