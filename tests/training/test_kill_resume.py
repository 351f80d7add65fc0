"""kill -9 at random moments, then ``--resume``: the run ends bit-identical to an uninterrupted one, on a
map-style dataset and on webdataset shards (a ShardStream)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers.engine_toys import Mixture, tiny_recipe
from safetensors.torch import load_file

from proreflow.training.streams import write_shards

RECIPE = tiny_recipe(checkpoint_every=3, keep_checkpoints=2,
                     defaults={"lr": 1e-2, "batch_size": 8, "steps": 80, "ema_decay": 0.9, "solver_steps": 2,
                               "cond_dropout": 0.2})
FILES = ("student.safetensors", "stage-1-4w/ema.safetensors", "stage-2-2w/ema.safetensors")


def _command(config: Path, out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "proreflow.cli", "train", "--config", str(config), "--out", str(out),
            "--no-progress"] + (["--resume"] if resume else [])


@pytest.mark.slow
@pytest.mark.parametrize("data", ["map-style", "shards"])
def test_kill_9_at_random_moments_then_resume_is_bit_identical(tmp_path, data):
    config = tmp_path / "c.yaml"
    spec = {"name": "helpers.engine_toys:make_setup"}
    if data == "shards":  # the mixture's 64 items in 7 shards (test_streams.shard_setup)
        items = Mixture(64)
        write_shards((items[i] for i in range(64)), tmp_path / "data" / "s-%03d.tar", max_count=10)
        spec = {"name": "test_streams:shard_setup", "shards": str(tmp_path / "data")}
    config.write_text(yaml.safe_dump({"setup": spec, **RECIPE}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    subprocess.run(_command(config, tmp_path / "straight", False) + ["--print-config"], env=env, check=True,
                   capture_output=True)
    startup = time.monotonic() - start  # imports: a kill before this point interrupts nothing
    start = time.monotonic()
    subprocess.run(_command(config, tmp_path / "straight", False), env=env, check=True, capture_output=True)
    duration = time.monotonic() - start

    rng, out, kills = random.Random(11), tmp_path / "killed", 0
    for attempt in range(8):
        proc = subprocess.Popen(_command(config, out, attempt > 0), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:  # a random moment of the training part of a whole run
            proc.wait(timeout=startup + rng.uniform(0.0, 0.6) * (duration - startup))
        except subprocess.TimeoutExpired:
            proc.kill()  # SIGKILL: no handler, no cleanup
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0, proc.stderr.read().decode()
        break
    else:
        proc = subprocess.run(_command(config, out, True), env=env, capture_output=True)
        assert proc.returncode == 0, proc.stderr.decode()
    print(f"{kills} kills (startup {startup:.1f} s, whole run {duration:.1f} s)")
    assert kills >= 2
    for name in FILES:
        a, b = load_file(str(out / name)), load_file(str(tmp_path / "straight" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    summaries = [json.loads((run / "summary.json").read_text()) for run in (out, tmp_path / "straight")]
    assert [s["samples"] for s in summaries[0]] == [s["samples"] for s in summaries[1]] == [640, 640]
