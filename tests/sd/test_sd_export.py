"""Exports load with diffusers alone: a fresh interpreter without proreflow samples them like ``proreflow.sample``.

The stock ``DDIMScheduler`` of an export (:data:`TRAILING_DDIM_LINE`) steps on the timesteps
``t * T - 1`` and the ``abar`` that ``proreflow.sample`` uses (:mod:`proreflow.schedules`): the same
sampler, so they differ by float32 rounding alone. Measured on the tiny pipelines (fixed latents,
guidance 2, student = teacher UNet or teacher + LoRA), the largest differences were 3.1e-5 in
latents (whose values reach 67: 4.6e-7 relative; SD1.5 at 4 windows 2.7e-5, SDXL at 2 2.3e-5, LoRA
at 2 3.1e-5) and 3.6e-7 in images in [0, 1]; the tolerances sit a few times above them (before the
timestep convention was diffusers', the gaps were 1.1e-2 and 1.2e-4). The base pipeline's own scheduler
(what LoRA users get without the line) is shown to miss by far more. The kohya copy of a LoRA is
checked by diffusers' kohya loader (the same UNet) and against ComfyUI's key map.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from proreflow import Denoiser, TimeWindows, sample
from proreflow.cli import main as cli
from proreflow.sd import ProReflowScheduler
from proreflow.sd.export import KOHYA_LORA, export_lora, export_pipeline, model_card, read_export_info
from proreflow.sd.lora import add_lora
from proreflow.sd.pipeline import load_teacher, unet_network
from proreflow.sd.scheduler import PROREFLOW_LINE, TRAILING_DDIM_LINE

WORKER = Path(__file__).with_name("fresh_diffusers.py")
PROMPTS = ["a cat", "a dog"]
GUIDANCE = 2.0
LATENT_TOL, IMAGE_TOL = 1e-4, 2e-6  # measured 3.1e-5, 3.6e-7: see the module doc


def fresh_sample(tmp_path: Path, pipeline: str, model: Path, noise: torch.Tensor, steps: int, lora: Path | None = None,
                 weight_name: str | None = None, scheduler_line: str | None = None, sigmas: list | None = None,
                 without: tuple[str, ...] = (), prompts: list[str] = PROMPTS, guidance: float = GUIDANCE,
                 call_kwargs: dict | None = None):
    """(latents, images N x H x W x C, scheduler class name) from fresh_diffusers.py (``sigmas``, ``without``:
    its SD3 keys; ``call_kwargs``: more keyword arguments of the pipeline call, e.g. PixArt's height / width)."""
    save_file({"latents": noise.contiguous()}, str(tmp_path / "noise.safetensors"))
    spec = {"pipeline": pipeline, "model": str(model), "lora": str(lora) if lora else None, "weight_name": weight_name,
            "scheduler_line": scheduler_line, "prompts": prompts, "steps": steps, "sigmas": sigmas,
            "without": list(without), "guidance": guidance,
            "latents": str(tmp_path / "noise.safetensors"), "out": str(tmp_path / "fresh.safetensors"),
            "call_kwargs": call_kwargs or {}}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(WORKER), json.dumps(spec)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = load_file(str(tmp_path / "fresh.safetensors"))
    with safe_open(str(tmp_path / "fresh.safetensors"), framework="pt") as f:
        scheduler = f.metadata()["scheduler"]
    return out["latents"], out["images"], scheduler


def proreflow_sample(teacher, unet, noise: torch.Tensor, windows: int):
    """``proreflow.sample`` of ``unet`` at one step per window, and its images as the pipeline returns them."""
    denoiser = Denoiser(unet_network(unet), teacher.prediction_type, teacher.schedule)
    latents = sample(denoiser, noise, TimeWindows(windows), windows, teacher.encode_prompts(PROMPTS),
                     teacher.null_cond(), GUIDANCE)
    images = (teacher.decode_latents(latents) + 1) / 2
    return latents, images.permute(0, 2, 3, 1)


def noise_for(teacher) -> torch.Tensor:
    return torch.randn(len(PROMPTS), *teacher.latent_shape(16), generator=torch.Generator().manual_seed(0))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("fixture, windows", [("sd15_dir", 4), ("sdxl_dir", 2)])
def test_exported_pipeline_loads_and_samples_without_proreflow(request, fixture, windows, tmp_path):
    teacher = load_teacher(request.getfixturevalue(fixture))
    export_pipeline(teacher.unet, teacher, tmp_path / "export", num_windows=windows, guidance=GUIDANCE)
    index = json.loads((tmp_path / "export/model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    noise = noise_for(teacher)
    latents, images, scheduler = fresh_sample(tmp_path, type(teacher.pipe).__name__, tmp_path / "export", noise,
                                              windows)
    want_latents, want_images = proreflow_sample(teacher, teacher.unet, noise, windows)
    print(f"{fixture} {windows} windows: latents {max_diff(latents, want_latents):.2e} "
          f"(scale {want_latents.abs().max():.1f}), images {max_diff(images, want_images):.2e}")
    assert scheduler == "DDIMScheduler"
    assert max_diff(latents, want_latents) < LATENT_TOL and max_diff(images, want_images) < IMAGE_TOL

    # the opt-in line: proreflow's exact sampler on the same folder
    pipe = type(teacher.pipe).from_pretrained(tmp_path / "export")
    exec(PROREFLOW_LINE.format(windows=windows), {"pipe": pipe, "ProReflowScheduler": ProReflowScheduler})
    exact = pipe(PROMPTS, num_inference_steps=windows, guidance_scale=GUIDANCE, latents=noise,
                 output_type="latent").images
    torch.testing.assert_close(exact, want_latents, rtol=1e-5, atol=1e-5 * want_latents.abs().max().item())


@pytest.fixture(scope="module")
def lora_export(sd15_dir, tmp_path_factory):
    """A LoRA student (teacher + random LoRA, alpha != rank) exported for the base pipeline."""
    teacher = load_teacher(sd15_dir)
    student = add_lora(copy.deepcopy(teacher.unet), rank=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("lora") / "export"
    export_lora(student, teacher, out, num_windows=2, guidance=GUIDANCE)
    return teacher, student, out


def test_lora_with_the_scheduler_line_samples_like_proreflow(lora_export, sd15_dir, tmp_path):
    """The base pipeline + LoRA + TRAILING_DDIM_LINE, in a fresh interpreter without proreflow."""
    teacher, student, out = lora_export
    noise = noise_for(teacher)
    latents, images, scheduler = fresh_sample(tmp_path, "StableDiffusionPipeline", sd15_dir, noise, 2, out,
                                              scheduler_line=TRAILING_DDIM_LINE)
    want_latents, want_images = proreflow_sample(teacher, student, noise, 2)
    print(f"LoRA: latents {max_diff(latents, want_latents):.2e}, images {max_diff(images, want_images):.2e}")
    assert scheduler == "DDIMScheduler"
    assert max_diff(latents, want_latents) < LATENT_TOL and max_diff(images, want_images) < IMAGE_TOL

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd15_dir)  # without the line: the base pipeline's DDPM
    pipe.load_lora_weights(out)
    pipe.set_progress_bar_config(disable=True)
    other = pipe(PROMPTS, num_inference_steps=2, guidance_scale=GUIDANCE, latents=noise, output_type="latent").images
    assert type(pipe.scheduler).__name__ == "DDPMScheduler" and max_diff(other, want_latents) > 10 * LATENT_TOL


def test_kohya_copy_loads_as_the_same_unet(lora_export, sd15_dir):
    """lora_kohya.safetensors through diffusers' kohya loader gives the student's UNet (alpha 8, rank 4)."""
    from diffusers import StableDiffusionPipeline

    teacher, student, out = lora_export
    pipe = StableDiffusionPipeline.from_pretrained(sd15_dir)
    pipe.load_lora_weights(out, weight_name=KOHYA_LORA)
    x, cond = torch.randn(2, 4, 8, 8), {"encoder_hidden_states": torch.randn(2, 16, 32)}
    with torch.no_grad():
        want, before = student(x, 321.0, **cond).sample, teacher.unet(x, 321.0, **cond).sample
        torch.testing.assert_close(pipe.unet(x, 321.0, **cond).sample, want, rtol=1e-5, atol=1e-5)
    assert max_diff(want, before) > 1e-2  # the LoRA changes the UNet


def test_kohya_keys_are_the_ones_comfyui_maps(lora_export):
    """ComfyUI (comfy/lora.py, model_lora_keys_unet) maps ``lora_unet_<diffusers name, dots as _>``."""
    teacher, student, out = lora_export
    kohya = load_file(str(out / KOHYA_LORA))
    modules = {name.replace(".", "_") for name, _ in teacher.unet.named_modules()}
    stems = {key.split(".")[0] for key in kohya}
    assert all(s.startswith("lora_unet_") and s[len("lora_unet_"):] in modules for s in stems)
    assert all(kohya[f"{s}.alpha"].item() == 8.0 and kohya[f"{s}.lora_down.weight"].shape[0] == 4 for s in stems)
    lora_layers = {n for n, _ in student.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
    assert len(stems) == len(lora_layers)


def test_dtype_and_model_card(sd15_dir, tmp_path):
    teacher = load_teacher(sd15_dir)
    metrics = [{"name": "teacher DDIM-32", "steps": 32, "fid": 25.5}, {"name": "student 4-step", "steps": 4,
                                                                    "fid": 27.25, "psnr_to_teacher": 21.5}]
    export_pipeline(teacher.unet, teacher, tmp_path / "export", 4, extra={"recipe": "tiny", "teacher_guidance": 4.0},
                    dtype=torch.bfloat16, metrics=metrics)
    saved = load_file(str(tmp_path / "export/unet/diffusion_pytorch_model.safetensors"))
    want = {k: v.to(torch.bfloat16) for k, v in teacher.unet.state_dict().items()}
    assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want)
    assert teacher.unet.dtype == torch.float32  # the teacher itself is left as it was
    card = (tmp_path / "export/README.md").read_text()
    assert card == model_card(read_export_info(tmp_path / "export"), metrics)
    assert card.startswith("---\nlibrary_name: diffusers\n") and "num_inference_steps=4" in card
    assert "| recipe | tiny |" in card and "| teacher guidance it reproduces | 4.0 |" in card
    assert "| student 4-step | 4 | 27.25 | – | – | – | 21.50 | – |" in card
    assert TRAILING_DDIM_LINE in model_card({**read_export_info(tmp_path / "export"), "base": str(sd15_dir)})
    assert PROREFLOW_LINE.format(windows=4) in card


def test_export_command_pushes_to_hub(sd15_dir, image_dir, tmp_path, monkeypatch):
    """--push-to-hub, offline up to the upload: create_repo and upload_folder receive the export."""
    import huggingface_hub

    from proreflow.sd.setup import build_sd_setup
    from proreflow.training import train

    setup = build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), device="cpu", lora_rank=2)
    recipe = {"name": "tiny", "checkpoint_every": 0, "stages": [{"windows": 2, "steps": 1, "batch_size": 2,
                                                                  "guidance": 3.0}]}
    train(recipe, setup, tmp_path / "run", progress=False)
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        calls.append(("upload", kw["repo_id"], sorted(os.listdir(kw["folder_path"]))))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert cli(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "lora"), "--lora",
                "--dtype", "float16", "--push-to-hub", "me/tiny", "--private"]) == 0
    assert calls[0] == ("create", "me/tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[1] == ("upload", "me/tiny", ["README.md", KOHYA_LORA, "proreflow.json",
                                               "pytorch_lora_weights.safetensors"])
    info = read_export_info(tmp_path / "lora")
    assert 'pipe.load_lora_weights("me/tiny")' in (tmp_path / "lora/README.md").read_text()
    assert info["teacher_guidance"] == 3.0 and info["guidance"] == 1.0 and info["dtype"] == "float16"
    assert {v.dtype for k, v in load_file(str(tmp_path / "lora" / KOHYA_LORA)).items()
            if not k.endswith(".alpha")} == {torch.float16}


def test_docs_show_the_tested_lines():
    text = (Path(__file__).resolve().parents[2] / "docs/stable-diffusion.md").read_text()
    assert TRAILING_DDIM_LINE in text and PROREFLOW_LINE.format(windows=4) in text
    assert "proreflow must be installed" not in text
