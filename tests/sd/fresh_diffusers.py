"""Load and sample an export in a fresh interpreter where proreflow cannot be imported: SPEC_JSON.

SPEC: pipeline (class name), model (folder), lora (folder or null), weight_name (or null),
scheduler_line (exec'd with ``pipe`` and ``DDIMScheduler`` in scope, or null), prompts, steps,
sigmas (a list: custom ``sigmas`` instead of ``num_inference_steps``, as SD3 exports sample; optional),
without (components to load as None, e.g. SD3's T5 ``text_encoder_3``, ``tokenizer_3``; optional),
guidance, latents (safetensors file with ``latents``), out (safetensors file to write: ``latents``,
``images`` in [0, 1] as N x H x W x C, metadata ``scheduler``), call_kwargs (optional: more keyword
arguments of the pipeline call, e.g. PixArt's height / width). Run by test_sd_export.py,
tests/sd3/test_sd3_export.py and tests/pixart.
"""

from __future__ import annotations

import importlib.abc
import json
import sys


class NoProreflow(importlib.abc.MetaPathFinder):
    """Makes ``import proreflow`` fail as it does where proreflow is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "proreflow" or name.startswith("proreflow."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: this interpreter has no proreflow)")
        return None


if __name__ == "__main__":
    sys.meta_path.insert(0, NoProreflow())
    spec = json.loads(sys.argv[1])
    import diffusers
    import torch
    from diffusers import DDIMScheduler
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    without = {name: None for name in spec.get("without") or ()}
    pipe = getattr(diffusers, spec["pipeline"]).from_pretrained(spec["model"], **without)
    pipe.set_progress_bar_config(disable=True)
    if spec["lora"]:
        pipe.load_lora_weights(spec["lora"], weight_name=spec["weight_name"])
    if spec["scheduler_line"]:
        exec(spec["scheduler_line"], {"pipe": pipe, "DDIMScheduler": DDIMScheduler})
    noise = load_file(spec["latents"])["latents"]
    steps = {"sigmas": spec["sigmas"]} if spec.get("sigmas") else {"num_inference_steps": spec["steps"]}
    kwargs = dict(guidance_scale=spec["guidance"], **steps, **spec.get("call_kwargs", {}))
    latents = pipe(spec["prompts"], latents=noise, output_type="latent", **kwargs).images
    images = pipe(spec["prompts"], latents=noise, output_type="np", **kwargs).images
    assert "proreflow" not in sys.modules and not any(m.startswith("proreflow.") for m in sys.modules)
    save_file({"latents": latents.contiguous(), "images": torch.from_numpy(images).contiguous()}, spec["out"],
              metadata={"scheduler": type(pipe.scheduler).__name__})
