"""Two CPU processes (torchrun, gloo) train the same weights as one process with the same global batch
(8 samples per step: 2 processes x 2 accumulation steps x 2 samples, against 1 x 2 x 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.engine_toys import SkippingMixture, make_setup, skipped_per_step, tiny_recipe
from safetensors.torch import load_file, save_file

from proreflow.training import train

pytestmark = pytest.mark.distributed  # torchrun, 2 CPU processes

WORKER = Path(__file__).with_name("dist_worker.py")


def test_two_processes_match_one(tmp_path):
    recipe = tiny_recipe(checkpoint_every=3, defaults={"lr": 1e-2, "batch_size": 8, "grad_accum": 2, "steps": 6,
                                                       "ema_decay": 0.8, "solver_steps": 2, "cond_dropout": 0.25})
    setup = make_setup()
    setup.dataset = SkippingMixture()  # items naming skipped ones: gathered from both processes
    save_file(setup.teacher_model.state_dict(), str(tmp_path / "teacher.safetensors"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(tmp_path / "two"), json.dumps(recipe), str(tmp_path / "teacher.safetensors")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    one = train(recipe, setup, tmp_path / "one", progress=False)
    a, b = load_file(str(tmp_path / "one/student.safetensors")), load_file(str(tmp_path / "two/student.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-9)
    summary = json.loads((tmp_path / "two/summary.json").read_text())
    assert [s["teacher_evals"] for s in summary] == [s.teacher_evals for s in one.stages]
    assert [s["samples"] for s in summary] == [48, 48]
    for stage, (two, one_stage) in enumerate(zip(summary, one.stages, strict=True)):
        gone = skipped_per_step(len(setup.dataset), recipe["seed"], stage, 8, 6)
        assert two["skipped_items"] == one_stage.skipped_items == len(gone) > 0
        assert two["skipped_item_names"] == one_stage.skipped_item_names == list(dict.fromkeys(gone))[:10]
    assert sorted(p.name for p in (tmp_path / "two/checkpoints/step-00000009").iterdir()) == [
        "checksums.json", "ema.safetensors", "meta.json", "rng-0.pt", "rng-1.pt", "state.pt", "student.safetensors"]
    meta = json.loads((tmp_path / "two/checkpoints/step-00000009/meta.json").read_text())
    assert meta["num_processes"] == 2


def test_two_processes_build_the_trajectory_shards_between_them_and_match_one_process(tmp_path):
    """Teacher start points through a target cache of 4 shards, solved by 2 processes (shards 0, 2 and 1, 3):
    the same weights as one process solving online, and the evaluations of one trajectory per item."""
    recipe = tiny_recipe(target_cache=str(tmp_path / "cache"),
                         defaults={"lr": 1e-2, "batch_size": 8, "grad_accum": 2, "steps": 4, "ema_decay": 0.8,
                                   "start_points": "teacher", "guidance": 2.0},
                         stages=[{"windows": 4, "solver_steps": 2}, {"windows": 2, "solver_steps": 4}])
    setup = make_setup()
    setup.dataset = SkippingMixture()
    save_file(setup.teacher_model.state_dict(), str(tmp_path / "teacher.safetensors"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(tmp_path / "two"), json.dumps(recipe), str(tmp_path / "teacher.safetensors"), "shard_size=16"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(list((tmp_path / "cache").glob("trajectories-*/shard-*.safetensors"))) == 4

    train({**recipe, "target_cache": ""}, setup, tmp_path / "one", progress=False)
    a, b = load_file(str(tmp_path / "one/student.safetensors")), load_file(str(tmp_path / "two/student.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-9)
    summary = json.loads((tmp_path / "two/summary.json").read_text())
    assert [s["teacher_evals"] for s in summary] == [64 * 4 * 2 * 2, 0]  # items x windows x steps x guided


def test_the_documented_cpu_launch_line_starts_two_processes_that_train_the_weights_of_one(tmp_path):
    """docs/multi-gpu.md's CPU line, ``ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 -m
    proreflow.cli train ...``, through the real CLI: train.log says world size 2, and the float64 student
    equals the one-process run's within 1e-9 (the reduction order is all that differs)."""
    import yaml

    recipe = tiny_recipe(defaults={"lr": 1e-2, "batch_size": 8, "grad_accum": 2, "steps": 4, "ema_decay": 0.8,
                                   "solver_steps": 2})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"setup": {"name": "helpers.engine_toys:make_setup"}, **recipe}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "proreflow.cli", "train", "--config", str(config), "--out", str(tmp_path / "two"), "--no-progress",
           "--trust-setup-code"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (tmp_path / "two" / "train.log").read_text()
    assert "# world size 2 (processes), device cpu" in log and "world size 1" not in log

    train(recipe, make_setup(), tmp_path / "one", progress=False)
    a, b = load_file(str(tmp_path / "one/student.safetensors")), load_file(str(tmp_path / "two/student.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-9)
