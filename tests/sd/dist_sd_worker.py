"""A tiny Stable Diffusion training run for test_sd_distributed.py, launched with ``torchrun``:
OUT RECIPE_JSON TEACHER_DIR IMAGE_DIR CACHE_DIR [fsdp_on_cpu] [sd3]. Each process that encodes part of the
latent cache appends its rank to OUT.cache-builders; ``fsdp_on_cpu`` lets accelerate's FSDP plugin shard the
student on CPU (``tests/helpers/fsdp_on_cpu.py``); ``sd3`` trains the SD3 setup of an SD3 pipeline instead."""

from __future__ import annotations

import json
import sys

import torch

import proreflow.sd.latent_cache as latent_cache
import proreflow.sd.setup as sd_setup
from proreflow.training import train

if __name__ == "__main__":
    torch.set_num_threads(1)
    out, recipe, teacher, images, cache = sys.argv[1:6]
    if "fsdp_on_cpu" in sys.argv[6:]:
        from helpers.fsdp_on_cpu import lift_cpu_gate

        lift_cpu_gate(out)
    encode_part = latent_cache.encode_part

    def recording_encode_part(*args, **kwargs):
        with open(f"{out}.cache-builders", "a") as f:
            f.write(f"{sd_setup.process_state().process_index}\n")
        return encode_part(*args, **kwargs)

    latent_cache.encode_part = recording_encode_part  # the one cache encoder, called by build_latent_cache
    if "sd3" in sys.argv[6:]:
        from proreflow.sd3.setup import build_sd3_setup

        setup = build_sd3_setup(teacher=teacher, data=images, cache_dir=cache)
    else:
        setup = sd_setup.build_sd_setup(teacher=teacher, data=images, cache_dir=cache)
    train(json.loads(recipe), setup, out, progress=False)
