"""Two CPU processes (torchrun, gloo) train the Stable Diffusion setup to the weights one process trains
with the same global batch; both build the latent cache (each its half of the images), to the cache one
process builds, and only rank 0 writes the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from proreflow.sd.latent_cache import LatentCacheDataset
from proreflow.sd.setup import build_sd_setup
from proreflow.training import train

WORKER = Path(__file__).with_name("dist_sd_worker.py")
RECIPE = {"name": "tiny-dist", "checkpoint_every": 2, "log_every": 1, "seed": 3,
          "defaults": {"batch_size": 4, "lr": 1e-3, "adam_epsilon": 1e-3, "warmup_steps": 0, "guidance": 2.0,
                       "ema_decay": 0.5, "solver_steps": 1, "cond_dropout": 0.25},
          "stages": [{"windows": 2, "steps": 2}]}


def test_two_processes_match_one(sd15_dir, image_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("ACCELERATE_USE_CPU", None)  # the setup must find the process group without being told
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(tmp_path / "two"), json.dumps(RECIPE), str(sd15_dir), str(image_dir), str(tmp_path / "cache-two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # one process trains on the cache the two built (the rows of a cache one process builds differ by the
    # encoders' rounding for another batch composition: compared below), so the runs differ by the
    # all-reduce's rounding alone
    setup = build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), cache_dir=str(tmp_path / "cache-two"),
                           device="cpu")
    train(RECIPE, setup, tmp_path / "one", progress=False)
    build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), cache_dir=str(tmp_path / "cache-one"), device="cpu")
    a, b = load_file(str(tmp_path / "one/student.safetensors")), load_file(str(tmp_path / "two/student.safetensors"))
    start = setup.teacher_model.state_dict()
    assert a.keys() == b.keys()
    # float32 UNet: the all-reduced mean of two half batches rounds differently from one batch of four.
    # Adam's first step m / (sqrt(v) + eps) is about sign(g) wherever |g| >> eps, which at the default
    # eps 1e-8 blows that rounding up to a whole lr in elements whose gradient is nearly 0 (measured: 98
    # elements off, up to 2.8e-4); adam_epsilon 1e-3 keeps the step linear in small gradients, so the gap
    # is the rounding (measured: 6e-8 against an update of 1.7e-3)
    update = max((a[k] - start[k].float()).abs().max().item() for k in a)
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    assert update > 1e-4 and gap < 1e-3 * update
    one, two = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two"))
    assert one[0]["final_loss"] == pytest.approx(two[0]["final_loss"], rel=1e-5)
    builders = sorted((tmp_path / "two.cache-builders").read_text().split())
    assert builders == ["0", "1"]  # each process encoded its part
    cache_one, cache_two = LatentCacheDataset(tmp_path / "cache-one"), LatentCacheDataset(tmp_path / "cache-two")
    assert len(cache_one.manifest["shards"]) == 1 and len(cache_two.manifest["shards"]) == 2
    assert cache_one.manifest["skipped"] == cache_two.manifest["skipped"] and len(cache_one) == len(cache_two) > 1
    assert sorted(p.name for p in (tmp_path / "cache-two").iterdir()) == [
        "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    for row in range(len(cache_one)):  # the same rows in the same order (float16 storage)
        (x1, c1), (x2, c2) = cache_one[row], cache_two[row]
        torch.testing.assert_close(x1, x2, rtol=0, atol=2e-3)
        torch.testing.assert_close(c1["encoder_hidden_states"], c2["encoder_hidden_states"], rtol=0, atol=2e-3)
    meta = json.loads((tmp_path / "two/checkpoints/step-00000002/meta.json").read_text())
    assert meta["num_processes"] == 2
    assert sorted(p.name for p in (tmp_path / "two/checkpoints/step-00000002").glob("rng-*.pt")) == ["rng-0.pt",
                                                                                                       "rng-1.pt"]
    assert [s["samples"] for s in two] == [8] and two[0]["teacher_evals"] == one[0]["teacher_evals"]
