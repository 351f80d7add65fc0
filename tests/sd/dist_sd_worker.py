"""A tiny Stable Diffusion training run for test_sd_distributed.py, launched with ``torchrun``:
OUT RECIPE_JSON TEACHER_DIR IMAGE_DIR CACHE_DIR. Each process that builds the latent cache
appends its rank to OUT.cache-builders."""

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
    build = latent_cache.build_latent_cache

    def recording_build(*args, **kwargs):
        with open(f"{out}.cache-builders", "a") as f:
            f.write(f"{sd_setup.process_state().process_index}\n")
        return build(*args, **kwargs)

    latent_cache.build_latent_cache = recording_build  # the one cache builder, called by latent_dataset
    setup = sd_setup.build_sd_setup(teacher=teacher, data=images, cache_dir=cache)
    train(json.loads(recipe), setup, out, progress=False)
