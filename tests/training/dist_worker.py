"""A tiny training run for test_distributed.py, launched with ``torchrun``: OUT RECIPE_JSON TEACHER [OPTION=VALUE ...]
with options ``shard_size=N`` (trajectories per target-cache shard, for runs with teacher start points),
``shards=PATH`` (train on a ShardStream of them instead of SkippingMixture; test_streams.py), ``resume=NAME``
(go on from that checkpoint of OUT) and ``fsdp_on_cpu=1`` (test_fsdp.py: ``tests/helpers/fsdp_on_cpu.py``; each process
also saves the network ``train`` returns as ``OUT.result-<rank>.st``)."""

from __future__ import annotations

import json
import sys

import torch
from helpers.engine_toys import SkippingMixture, make_setup
from helpers.fsdp_on_cpu import lift_cpu_gate
from safetensors.torch import load_file, save_file

from proreflow.training import target_cache, train
from proreflow.training.streams import ShardStream

if __name__ == "__main__":
    torch.set_num_threads(1)
    out, recipe, teacher = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    options = dict(arg.split("=", 1) for arg in sys.argv[4:])
    if "shard_size" in options:
        target_cache.SHARD_SIZE = int(options["shard_size"])
    if options.get("fsdp_on_cpu"):
        lift_cpu_gate(out)
    setup = make_setup(pretrained=False)
    setup.teacher_model.load_state_dict(load_file(teacher))
    setup.dataset = ShardStream(options["shards"]) if "shards" in options else SkippingMixture()
    result = train(recipe, setup, out, progress=False, resume=options.get("resume", False))
    if options.get("fsdp_on_cpu"):  # the returned network, as each process has it
        rank = torch.distributed.get_rank()
        save_file({k: v.cpu().contiguous() for k, v in result.module.state_dict().items()}, f"{out}.result-{rank}.st")
