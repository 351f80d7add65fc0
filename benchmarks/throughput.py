"""Training throughput of ProReflow on Stable Diffusion UNets, beside the raw UNet speed.

For a UNet architecture (SD1.5 at 512 px, SDXL at 1024 px: the published configs with random
weights, nothing downloaded) this runs the training engine's own optimiser steps
(``proreflow.training.StageRunner``, which ``train`` runs too) on synthetic latents and text
states, PeRFlow's stage shape (4 windows, ``--solver-steps`` teacher DDIM steps per window, no
guidance), and in the same process times the raw UNet:

- ``fwd``: the frozen teacher's forward (no gradients, the training dtype), images/s;
- ``fwd+bwd``: the student's forward and backward (float32 master weights under autocast);
- ``train``: samples/s, teacher evaluations/s and optimiser steps/s of the engine's loop;
- ``ideal``: the samples/s the loop would reach with no overhead,
  ``1 / (solver_steps / fwd + 1 / fwd_bwd)``; ``efficiency = train / ideal``;
- timing: after the warm-up steps (and one untimed raw call each), ``--steps`` interleaved rounds, each
  one engine optimiser step, then the ``solver_steps`` teacher forwards and the one student
  forward+backward that step needs, on the same batch; every rate is from the medians of the rounds,
  so load from other processes or clock drift affects the loop and the raw networks alike (the earlier
  version timed them in separate 2-call blocks; its ``--tiny`` ratio read 381 % once and 47 % on a
  loaded machine, so it could not be trusted);
- peak memory (GPU: ``max_memory_allocated``; CPU: the process's max RSS).

Usage::

    python benchmarks/throughput.py --tiny                          # small UNet on CPU, < 1 min
    python benchmarks/throughput.py --model sd15 --dtype bf16 --compile --batch 32
    python benchmarks/throughput.py --gpu-suite --out-md $OUT/throughput.md   # ~4 min on an H200

The table is printed row by row and appended to ``--out-md`` (default ``docs/throughput.md``)
with the command, machine, date and versions. Runs from a checkout without installing
proreflow; needs torch, diffusers, accelerate, pyyaml.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# runwayml/stable-diffusion-v1-5 unet/config.json (860 M parameters)
SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2567 M parameters)
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
# a small UNet of the same kinds of blocks, for CPU
TINY_UNET = {
    "block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32, "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 8, "sample_size": 16, "in_channels": 4, "out_channels": 4,
}
MODELS = {  # name: (UNet config, image px, text tokens, text width, pooled width or None)
    "sd15": (SD15_UNET, 512, 77, 768, None),
    "sdxl": (SDXL_UNET, 1024, 77, 2048, 1280),
    "tiny": (TINY_UNET, 128, 16, 32, None),
}
HEADER = ("| model | px | batch | dtype | compile | params | UNet fwd img/s | UNet fwd+bwd img/s | train samples/s "
          "| teacher evals/s | student steps/s | ideal samples/s | efficiency | peak mem |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


@dataclass
class Config:
    model: str
    batch: int
    dtype: str  # bf16 | fp16 | fp32
    compile: bool
    solver_steps: int = 8
    warmup: int = 2
    steps: int = 5  # timed rounds
    grad_ckpt: bool = False


class SyntheticLatents(torch.utils.data.Dataset):
    """Random latents and SD / SDXL condition dicts (fixed per index)."""

    def __init__(self, n: int, latent: tuple[int, ...], tokens: int, width: int, pooled: int | None, px: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, *latent, generator=g)
        self.states = torch.randn(n, tokens, width, generator=g)
        self.pooled = torch.randn(n, pooled, generator=g) if pooled else None
        self.time_ids = torch.tensor([px, px, 0, 0, px, px], dtype=torch.float32)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        cond = {"encoder_hidden_states": self.states[i]}
        if self.pooled is not None:
            cond["added_cond_kwargs"] = {"text_embeds": self.pooled[i], "time_ids": self.time_ids}
        return self.x[i], cond


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn, device: torch.device) -> float:
    """Wall seconds of one call of ``fn``, the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB RSS"


def run_config(cfg: Config) -> dict:
    """Build the UNet, the setup and the engine's stage runner; time the loop and the raw UNet."""
    from diffusers import UNet2DConditionModel

    from proreflow.conditioning import map_cond
    from proreflow.schedules import VPSchedule
    from proreflow.sd.pipeline import unet_network
    from proreflow.training import DistillationSetup, StageRunner, make_accelerator
    from proreflow.training.batches import collate_items
    from proreflow.training.recipes import load_recipe

    unet_config, px, tokens, width, pooled = MODELS[cfg.model]
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[cfg.dtype]
    recipe = load_recipe({"name": "throughput", "mixed_precision": mixed, "stages": [
        {"windows": 4, "steps": cfg.warmup + cfg.steps, "solver_steps": cfg.solver_steps, "batch_size": cfg.batch,
         "lr": 1e-6, "alpha": 1.0, "guidance": 1.0}]})
    acc = make_accelerator(mixed)
    device = acc.device
    with torch.device(device):  # random init on the accelerator: seconds instead of minutes
        unet = UNet2DConditionModel.from_config(unet_config)
    params = sum(p.numel() for p in unet.parameters())
    if cfg.grad_ckpt:
        unet.enable_gradient_checkpointing()
    if cfg.compile:
        unet.compile()  # in place: the teacher and the student copy are both compiled
    dataset = SyntheticLatents(4 * cfg.batch, (4, px // 8, px // 8), tokens, width, pooled, px)  # VAE factor 8
    setup = DistillationSetup(teacher_model=unet, prediction_type="epsilon",
                              schedule=VPSchedule.from_betas("scaled_linear", 1000, 0.00085, 0.012),
                              dataset=dataset, uncond=None, adapter=unet_network)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype)

    runner = StageRunner(recipe, setup, 0, acc)  # the student (a teacher copy), optimiser, EMA, stage teacher
    student, optimizer = runner.student, runner.optimizer
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    x0, cond, _ = collate_items([dataset[i] for i in range(cfg.batch)])
    x = x0.to(device)
    cond = map_cond(lambda a: a.to(device), cond)
    timestep = torch.full((cfg.batch,), 500.0, device=device)
    teacher_net = setup.denoiser(runner.original, dtype=weight_dtype).network

    def fwd():
        with torch.no_grad(), acc.autocast():
            teacher_net(x.to(weight_dtype or x.dtype), timestep, cond)

    def fwd_bwd():
        with acc.autocast():
            out = unet_network(student)(x, timestep, cond)
        out.float().pow(2).mean().backward()
        optimizer.zero_grad(set_to_none=True)

    def teacher_fwds():
        for _ in range(cfg.solver_steps):
            fwd()

    runner.run(cfg.warmup)
    for fn in (fwd, fwd_bwd):
        fn()  # first calls (allocations, autotuning) untimed, as the loop's warm-up steps are
    # interleaved rounds: each round times one engine step, the teacher forwards one step needs and one
    # student forward+backward, so drift in clock or load (other processes) hits all three alike
    loop_s, teacher_s, student_s, evals = [], [], [], 0
    for _ in range(cfg.steps):
        start = time.perf_counter()
        evals += runner.run(1).teacher_evals
        _sync(device)
        loop_s.append(time.perf_counter() - start)
        teacher_s.append(_seconds(teacher_fwds, device))
        student_s.append(_seconds(fwd_bwd, device))
    runner.close()
    loop, t_teacher, t_student = (statistics.median(v) for v in (loop_s, teacher_s, student_s))
    raw = t_teacher + t_student  # the same step with nothing but the networks' work
    fwd_rate, fwd_bwd_rate = cfg.batch * cfg.solver_steps / t_teacher, cfg.batch / t_student
    train_rate, ideal = cfg.batch / loop, cfg.batch / raw
    row = {"model": cfg.model, "px": px, "batch": cfg.batch, "dtype": cfg.dtype,
           "compile": "on" if cfg.compile else "off", "params": f"{params / 1e6:.0f} M",
           "fwd": f"{fwd_rate:.1f}", "fwd_bwd": f"{fwd_bwd_rate:.1f}", "train": f"{train_rate:.2f}",
           "evals": f"{evals / cfg.steps / loop:.0f}", "steps": f"{1 / loop:.3f}", "ideal": f"{ideal:.2f}",
           "efficiency": f"{train_rate / ideal:.0%}", "memory": _peak_memory(device)}
    return row


def markdown_row(row: dict) -> str:
    return "| " + " | ".join(str(v) for v in row.values()) + " |"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def versions() -> str:
    import importlib.metadata as md

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("diffusers", "accelerate", "transformers"):
        try:
            parts.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(parts)


def gpu_suite(batch_sd15: int, batch_sdxl: int) -> list[tuple[Config, float]]:
    """SD1.5 bf16 eager / compiled, SDXL bf16 eager / compiled, with the seconds each needs left."""
    # seconds measured on an H200: 35, 35, 50 and 107 (compilation included)
    return [(Config("sd15", batch_sd15, "bf16", False), 45), (Config("sdxl", batch_sdxl, "bf16", False), 45),
            (Config("sd15", batch_sd15, "bf16", True), 90), (Config("sdxl", batch_sdxl, "bf16", True), 150)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a small UNet on CPU (fp32, eager)")
    p.add_argument("--gpu-suite", action="store_true", help="SD1.5 and SDXL, bf16, eager and compiled")
    p.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the student")
    p.add_argument("--batch", type=int, help="batch per optimiser step (default: 32 for sd15, 4 for sdxl)")
    p.add_argument("--solver-steps", type=int, default=8, help="teacher DDIM steps per window (PeRFlow: 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimiser steps first")
    p.add_argument("--steps", type=int, default=5, help="timed rounds (one engine step and its raw network work each)")
    p.add_argument("--budget-s", type=float, default=330, help="--gpu-suite: skip configs that no longer fit")
    p.add_argument("--out-md", default=str(ROOT / "docs" / "throughput.md"), help="markdown file to append to")
    args = p.parse_args(argv)

    if args.tiny:
        torch.set_num_threads(min(torch.get_num_threads(), 2))
        configs = [(Config("tiny", args.batch or 2, "fp32", False, solver_steps=2, warmup=3, steps=20), 0)]
    elif args.gpu_suite:
        if not torch.cuda.is_available():
            p.error("--gpu-suite needs a GPU; use --tiny on CPU")
        configs = gpu_suite(32, 4)
    else:
        batch = args.batch or (32 if args.model == "sd15" else 4)
        configs = [(Config(args.model, batch, args.dtype, args.compile, args.solver_steps, args.warmup, args.steps,
                           grad_ckpt=args.grad_ckpt), 0)]

    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    intro = (f"\n## {when}: {machine()}\n\n`{command}`\n\n{versions()}. Stage: 4 windows, {configs[0][0].solver_steps} "
             f"teacher DDIM steps per window, no guidance; {configs[0][0].warmup} warm-up + "
             f"{configs[0][0].steps} timed optimiser steps.\n\n{HEADER}\n")
    out = Path(args.out_md)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text("# Training throughput\n\nWritten by `benchmarks/throughput.py` (see its docstring for "
                       "what each column measures).\n")
    with out.open("a") as f:
        f.write(intro)
    print(intro, flush=True)
    start = time.perf_counter()
    for cfg, needs in configs:
        left = args.budget_s - (time.perf_counter() - start)
        if args.gpu_suite and left < needs:
            print(f"skipping {cfg.model} compile={cfg.compile}: {left:.0f} s left, needs ~{needs} s", flush=True)
            continue
        try:
            line = markdown_row(run_config(cfg))
        except torch.cuda.OutOfMemoryError as err:
            line = f"| {cfg.model} | | {cfg.batch} | {cfg.dtype} | {cfg.compile} | out of memory: {str(err)[:80]} |"
        gc.collect()  # the finished configuration's models and optimiser states
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(line, flush=True)
        with out.open("a") as f:
            f.write(line + "\n")
    print(f"appended to {out} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
