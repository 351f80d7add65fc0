"""LoRA distillation memory: one UNet in memory against two copies, at SD1.5 and SDXL size.

(a) one network, what proreflow does (``lora_rank > 0``): the student is the teacher's UNet with
LoRA layers (:func:`proreflow.sd.lora.add_lora`) and the teacher is that UNet with its adapters
disabled (:class:`proreflow.sd.lora.AdaptersDisabled` as ``DistillationSetup.teacher_view``); under
mixed precision its frozen base is in the mixed-precision dtype (the teacher's weights), only the
LoRA parameters are float32 (:func:`proreflow.training.stage_runner.cast_frozen`).
(b) two copies, the old way: the same setup with ``teacher_view=None``, so the engine deep-copies
the adapted UNet into the student (float32 master weights, the frozen base too) and keeps the
original as a frozen teacher (cast to the run's mixed-precision dtype).

Parameter bytes are exact counts of UNets built on the meta device (``accelerate.init_empty_weights``:
nothing allocated), from the published UNet configs written out below. Peak memory is measured:
each case runs in a fresh subprocess (one thread) that builds the random-weight UNet and the
engine's ``StageRunner`` and takes one optimiser step (teacher solve with adapters off, student
forward / backward, AdamW step on the LoRA parameters, EMA update); its peaks are the process's
max RSS (``getrusage``) and the step's own (``VmHWM`` reset just before it), minus the RSS after
imports. A case runs only if its predicted static bytes stay under ``--max-gib`` (and the child's
address space is capped with ``RLIMIT_AS``). Where no step can run (SDXL here), the activations
autograd saves are counted on the meta device (:func:`saved_activation_bytes`).

    python3 benchmarks/lora_memory.py                  # all cases; writes docs/lora-memory.md
    python3 benchmarks/lora_memory.py --case sd15 one bf16   # one measured case (prints JSON)
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RANK = 64
LATENT = {"sd15": 32, "sdxl": 32}  # latent side of the measured step (256 px): CPU, 24 GiB shared
ESTIMATED = [("sd15", 32), ("sd15", 64), ("sdxl", 128)]  # saved activations counted: measured size, 512, 1024 px
GiB = 2**30

# stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32)
CONFIGS = {"sd15": ("SD1.5", SD15), "sdxl": ("SDXL", SDXL)}
BYTES = {"no": 4, "bf16": 2}
MODES = {"one": "(a) one network", "two": "(b) two copies"}
GOAL = 0.6  # issue 16: LoRA peak memory <= 0.6 x the two-copy peak


def counts(key: str) -> tuple[int, int]:
    """Exact (base, LoRA) parameter counts of config ``key`` with rank-``RANK`` LoRA (meta device)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from proreflow.sd.lora import add_lora

    with init_empty_weights():
        unet = UNet2DConditionModel(**CONFIGS[key][1])
        base = sum(p.numel() for p in unet.parameters())
        add_lora(unet, RANK)
        lora = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    return base, lora


class _FlashSaves:
    """Attention that saves for backward what flash attention saves (q, k, v, output, logsumexp), in place
    of the attention matrix the meta device's math path would save; forward only (nothing is trained)."""

    def __init__(self):
        import torch

        sdpa = torch.nn.functional.scaled_dot_product_attention

        class Attention(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                with torch.no_grad():
                    out = sdpa(q, k, v)
                ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
                return out

            @staticmethod
            def backward(ctx, grad):
                raise NotImplementedError("counting only")

        self.sdpa, self.attention = sdpa, Attention

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if attn_mask is not None or dropout_p or is_causal or kwargs:
            raise ValueError("only plain attention is counted")
        return self.attention.apply(q, k, v)


def saved_activation_bytes(key: str, side: int, dtype_name: str) -> int:
    """Bytes autograd saves for backward in the LoRA student's forward (batch 1, ``side`` x ``side``
    latents), counted on the meta device: every saved tensor's base once, parameters excluded, attention
    as flash attention saves it (:class:`_FlashSaves`). The whole UNet and its inputs in ``dtype_name``
    (autocast would keep a few, e.g. normalisation statistics, in float32)."""
    import torch
    import torch.nn.functional as F
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from proreflow.sd.lora import add_lora

    dtype = getattr(torch, dtype_name)
    config = CONFIGS[key][1]
    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
        add_lora(unet, RANK)
    for p in unet.parameters():
        p.data = p.data.to(dtype)  # (ModelMixin.to warns about dtypes here)
    params = {id(p) for p in unet.parameters()}
    saved = {}

    def pack(t):
        base = t if t._base is None else t._base
        if id(base) not in params and id(t) not in params:
            saved[id(base)] = base.numel() * base.element_size()
        return t

    def meta(*shape):
        return torch.zeros(*shape, device="meta", dtype=dtype)
    kwargs = {"added_cond_kwargs": {"text_embeds": meta(1, 1280), "time_ids": meta(1, 6)}} if key == "sdxl" else {}
    sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, _FlashSaves()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(meta(1, 4, side, side), torch.tensor([500.0], device="meta"),
                 meta(1, 77, config["cross_attention_dim"]), **kwargs)
    finally:
        F.scaled_dot_product_attention = sdpa
    return sum(saved.values())


def static_bytes(base: int, lora: int, mode: str, precision: str) -> dict[str, int]:
    """Bytes the engine holds besides activations (``mode``: :data:`MODES`). Student: float32 LoRA weights and
    its frozen base in float32 (two copies) or at the mixed-precision width (one network: the teacher's
    weights); LoRA grads, AdamW's two moments and the EMA: float32 copies of the LoRA parameters; two copies
    add the teacher, the whole adapted UNet at the mixed-precision width."""
    frozen = BYTES[precision] if mode == "one" else 4
    held = {"student weights": frozen * base + 4 * lora, "LoRA grads": 4 * lora, "AdamW + EMA": 12 * lora}
    if mode == "two":
        held["teacher copy"] = BYTES[precision] * (base + lora)
    return held


# ------------------------------------------------------------------ one measured case (subprocess)

def _status(field: str) -> int:
    """A ``/proc/self/status`` figure in bytes (VmRSS, VmHWM: peak RSS since the last reset, VmSize)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def held_bytes(runner) -> int:
    """Bytes of the unique storages of a ``StageRunner``'s student and teacher parameters, AdamW state and EMA."""
    import torch

    trainee = runner.trainee
    teacher = getattr(trainee.original, "unet", trainee.original)  # AdaptersDisabled holds the student itself
    state = [t for s in trainee.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim]
    seen = {}
    for t in [*trainee.module.parameters(), *teacher.parameters(), *state, *runner.ema.shadow.values()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure(key: str, mode: str, precision: str, max_gib: float) -> dict:
    """One optimiser step of a LoRA distillation (module doc); returns bytes held and peak RSS."""
    import peft  # noqa: F401 (imported before the baseline, as add_lora imports it)
    import torch
    from diffusers import UNet2DConditionModel

    from proreflow.schedules import VPSchedule
    from proreflow.sd.lora import AdaptersDisabled, add_lora
    from proreflow.sd.pipeline import unet_network
    from proreflow.training import StageRunner
    from proreflow.training.setup import DistillationSetup

    torch.set_num_threads(1)
    baseline = _max_rss()
    cap = _status("VmSize") + int(max_gib * GiB)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    name, config = CONFIGS[key]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config)  # float32, as load_teacher gives it
    add_lora(unet, RANK)  # as build_sd_setup(lora_rank=RANK) does
    side, text = LATENT[key], (77, config["cross_attention_dim"])

    def cond(*batch):  # text states (SD1.5) or SDXL's dict with the pooled text and size / crop ids
        states = torch.randn(*batch, *text)
        if key != "sdxl":
            return states
        return {"encoder_hidden_states": states,
                "added_cond_kwargs": {"text_embeds": torch.randn(*batch, 1280), "time_ids": torch.randn(*batch, 6)}}
    items = [(torch.randn(4, side, side), cond()) for _ in range(2)]
    setup = DistillationSetup(teacher_model=unet, prediction_type="epsilon", schedule=VPSchedule.from_betas(),
                              dataset=items, uncond=cond(1), adapter=unet_network,
                              keep_on_dropout=("added_cond_kwargs.time_ids",) if key == "sdxl" else (),
                              teacher_view=None if mode == "two" else AdaptersDisabled)
    recipe = {"name": "lora-memory", "checkpoint_every": 0, "log_every": 1, "seed": 0, "mixed_precision": precision,
              "stages": [{"windows": 4, "steps": 1, "batch_size": 1, "lr": 1e-4, "solver_steps": 1,
                          "guidance": 1.0}]}
    start = time.perf_counter()
    runner = StageRunner(recipe, setup)
    setup_peak = _max_rss() - baseline
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the step's own peak from here
    result = runner.step()
    return {"config": name, "mode": mode, "precision": precision, "latent": side, "held": held_bytes(runner),
            "step_peak": _status("VmHWM") - baseline, "peak": max(setup_peak, _max_rss() - baseline),
            "loss": float(result.loss), "teacher_evals": result.teacher_evals,
            "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------ the table

def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    cores = sum(line.startswith("processor") for line in cpuinfo)
    kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    import diffusers
    import peft
    import torch
    return (f"{cpu}, {cores} cores, {kib / 2**20:.1f} GiB RAM; python {platform.python_version()}, "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}")


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def run_case(key: str, mode: str, precision: str, max_gib: float) -> dict:
    cmd = [sys.executable, __file__, "--case", key, mode, precision, "--max-gib", str(max_gib)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs=3, metavar=("CONFIG", "MODE", "PRECISION"),
                        help="measure one case: sd15|sdxl one|two no|bf16 (prints JSON)")
    parser.add_argument("--max-gib", type=float, default=12.0, help="no case predicted above this runs (GiB)")
    parser.add_argument("--out-md", default=str(Path(__file__).resolve().parents[1] / "docs" / "lora-memory.md"))
    args = parser.parse_args(argv)
    if args.case:
        key, mode, precision = args.case
        if key not in CONFIGS or mode not in MODES or precision not in BYTES:
            parser.error(f"--case {' '.join(args.case)}: expected sd15|sdxl one|two no|bf16")
        print(json.dumps(measure(*args.case, args.max_gib)))
        return 0

    started = datetime.datetime.now(datetime.timezone.utc)
    lines, measured, skipped = [], [], []
    n = {key: counts(key) for key in CONFIGS}
    lines += ["| config | base UNet params | LoRA params (rank 64) | mixed precision | (a) one network | "
              "(b) two copies | ratio a / b |", "|---|---:|---:|---|---:|---:|---:|"]
    for key, (name, _) in CONFIGS.items():
        base, lora = n[key]
        for precision in ("no", "bf16"):
            one = sum(static_bytes(base, lora, "one", precision).values())
            two = sum(static_bytes(base, lora, "two", precision).values())
            lines.append(f"| {name} | {base:,} | {lora:,} | {precision} | {gib(one)} | {gib(two)} | {one / two:.2f} |")
            if two > args.max_gib * GiB * 0.85:  # a margin for activations and the allocator
                skipped.append(f"{name} {precision}: two copies hold {gib(two)} before activations")
                continue
            for mode in MODES:
                print(f"measuring {name} {mode} {precision} ...", file=sys.stderr, flush=True)
                measured.append(run_case(key, mode, precision, args.max_gib))
                print(json.dumps(measured[-1]), file=sys.stderr, flush=True)
                expected = sum(static_bytes(base, lora, mode, precision).values()) - 4 * lora  # no grads
                if measured[-1]["held"] != expected:
                    raise RuntimeError(f"{name} {mode} {precision}: the engine holds {measured[-1]['held']} bytes, "
                                       f"the count says {expected}")
    rows = ["| config | latents | mixed precision | case | bytes held after the step (exact) | process peak | "
            "ratio / b | peak of the step | ratio / b | loss | seconds |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    ratios = {}
    for m in measured:
        two = next(o for o in measured
                   if (o["config"], o["precision"], o["mode"]) == (m["config"], m["precision"], "two"))
        process, step = m["peak"] / two["peak"], m["step_peak"] / two["step_peak"]
        if m["mode"] != "two":
            ratios[(m["config"], m["precision"], m["mode"])] = process, step
        rows.append(f"| {m['config']} | 1 x 4 x {m['latent']} x {m['latent']} | {m['precision']} | {MODES[m['mode']]} "
                    f"| "
                    f"{gib(m['held'])} | {gib(m['peak'])} | {process:.2f} | {gib(m['step_peak'])} | {step:.2f} "
                    f"| {m['loss']:.4f} | {m['seconds']:.0f} |")
    saved = {(key, side, dtype): saved_activation_bytes(key, side, dtype)
             for key, side in ESTIMATED for dtype in ("float32", "bfloat16")}
    write_page(Path(args.out_md), started, n, lines, rows, ratios, skipped, measured, saved)
    print(f"wrote {args.out_md}", file=sys.stderr)
    return 0


def verdict(ratio: float) -> str:
    return f"{ratio:.2f}, {'within' if ratio <= GOAL else 'above'} the goal of {GOAL}"


def write_page(path, started, n, params_table, peak_table, ratios, skipped, measured, saved) -> None:
    steps = {(m["config"], m["mode"], m["precision"]): m["step_peak"] for m in measured}
    if ("SD1.5", "one", "no") not in steps or ("SD1.5", "one", "bf16") not in steps:
        raise SystemExit("the page needs the measured SD1.5 cases: raise --max-gib")
    sd15, (base, lora) = n["sd15"], n["sdxl"]
    excess = {p: steps["SD1.5", "one", p] - sum(static_bytes(*sd15, "one", p).values()) for p in BYTES}
    factor = {p: excess[p] / saved["sd15", 32, dtype] for p, dtype in (("no", "float32"), ("bf16", "bfloat16"))}
    findings = [f"- {c}, mixed precision {p}: peak of the step {MODES[mode]} / two copies = {verdict(step)} "
                f"(process peak: {process:.2f})." for (c, p, mode), (process, step) in ratios.items()]
    findings += [f"- SD1.5 one network at 1 x 4 x 32 x 32: the step's peak exceeds the static bytes (first table, "
                 f"with gradients) by {gib(excess['no'])} without mixed precision and by {gib(excess['bf16'])} "
                 f"with bf16: {factor['no']:.2f} x and {factor['bf16']:.2f} x the saved activations counted on the "
                 f"meta device for this case, {gib(saved['sd15', 32, 'float32'])} (float32) and "
                 f"{gib(saved['sd15', 32, 'bfloat16'])} (bf16; last section; the rest: the backward pass's "
                 "temporaries, the teacher's forward, the allocator)."]
    (process_no, step_no), (process_bf16, step_bf16) = (ratios["SD1.5", p, "one"] for p in ("no", "bf16"))
    goal = (f"**Issue 16's goal, LoRA peak memory at most {GOAL} x today's two copies (SD1.5): measured "
            f"{step_no:.2f} without mixed precision and {step_bf16:.2f} with bf16** (peak of the step; "
            f"{'met' if max(step_no, step_bf16) <= GOAL else 'not met'}). The process peak gives {process_no:.2f} "
            f"and {process_bf16:.2f}: with bf16 it still holds the float32 UNet the setup loads, before the "
            "engine casts its base.")
    saved_table = ["| config | latents (batch 1) | saved for backward, float32 | bf16 |", "|---|---|---:|---:|"]
    saved_table += [f"| {CONFIGS[key][0]} | 4 x {side} x {side} | {gib(saved[key, side, 'float32'])} | "
                    f"{gib(saved[key, side, 'bfloat16'])} |" for key, side in ESTIMATED]
    now = sum(static_bytes(base, lora, "one", "bf16").values())
    act_low, act_high = saved["sdxl", 128, "bfloat16"], saved["sdxl", 128, "float32"]
    scaled = now + factor["bf16"] * act_low
    text = PAGE.format(
        date=started.strftime("%Y-%m-%d %H:%M UTC"), machine=machine(), rank=RANK, params="\n".join(params_table),
        peaks="\n".join(peak_table), skipped="; ".join(skipped) or "none", findings="\n".join(findings),
        goal=goal, saved="\n".join(saved_table), sdxl_now=gib(now), card=gib(24e9),
        sdxl_before=gib(sum(static_bytes(base, lora, "two", "bf16").values()) - 2 * (base + lora)),
        act_low=gib(act_low), act_high=gib(act_high), low=gib(now + act_low), high=gib(now + act_high),
        factor=f"{factor['bf16']:.2f}", scaled=gib(scaled), fits="does not fit" if scaled > 24e9 else "may fit")
    path.write_text(text)


PAGE = """# LoRA distillation memory: one UNet against two copies

Generated by `python3 benchmarks/lora_memory.py` on {date}; {machine}. No GPU was used.

With `lora_rank > 0` the Stable Diffusion setup trains LoRA layers (rank {rank}, attention projections
`to_q, to_k, to_v, to_out.0`) and its teacher is the same UNet with its adapters disabled
(`proreflow.sd.lora.AdaptersDisabled`), not a second copy: **(a) one network**. Its frozen base is
the teacher's weights, so under `mixed_precision: bf16` (or fp16) the engine keeps it in bf16, as
any teacher, and only the LoRA parameters in float32 (`proreflow.training.stage_runner.cast_frozen`, as
diffusers' LoRA training scripts do with `weight_dtype`): **the teacher's solve runs with bf16
weights under bf16 autocast**, and the student's forward computes with the same bf16 base. **(b) two
copies** is the engine with `teacher_view=None` (the way before): the student is a deep copy of the
adapted UNet with float32 master weights (its frozen base too) and the original stays as a frozen
teacher, cast to the run's mixed-precision dtype. In both, LoRA gradients, AdamW's two moments and
the EMA are float32 copies of the LoRA parameters. Tests: `tests/sd/test_sd_lora_teacher.py` (the
view's output equals the base UNet's exactly; training with one network equals training with two
copies), `tests/sd/test_sd_lora_mixed_precision.py` (under bf16: the bf16 base against the float32
base of before; resume is exact; the run's files hold the float32 LoRA weights alone, the LoRA
export writes them and the merged export folds them into the teacher's float32 base; the target
cache's teacher digest hashes the bf16 base) and `tests/sd/test_sd_lora_memory.py` (the engine
holds exactly the bytes counted below, on a tiny UNet, without and with bf16).

## Parameter and optimiser bytes (exact, full size)

Counted on the meta device from the published UNet configs written in the script (nothing
allocated). Activations are not included.

{params}

## Measured peak memory of one training step (CPU)

Each case is a fresh process with one thread: build the random-weight UNet, the engine's
`StageRunner` (recipe: 4 windows, 1 teacher DDIM step per window, no guidance, batch 1), one
optimiser step (teacher solve with adapters off, student forward / backward, AdamW on the LoRA
parameters, EMA). Process peak = the process's max RSS (`getrusage`) minus its RSS after
imports: it includes building the setup: the float32 UNet as the teacher is loaded (for (a) with
bf16 before its base is cast, one tensor at a time), for (b) the deep copy and with bf16 the moment
before the teacher copy is cast, when two float32 UNets exist. Peak of the step = the highest RSS
during the step alone (`VmHWM`, reset through `/proc/self/clear_refs` just before the step) minus
the same baseline: what training holds once set up. "Bytes held" is counted from the engine's own
objects after the step (unique storages of student and teacher parameters, optimiser state, EMA;
the LoRA gradients are freed by then) and equals the first table's count minus the gradients
exactly (the script checks it).

{peaks}

Not run (predicted above the script's memory cap, `--max-gib`): {skipped}; for those the first
table is the figure.

## Reading the numbers

{findings}

- {goal}
- Without mixed precision nothing is cast: both ways train float32 weights, and the loss of (a)
  equals (b)'s. With bf16 the student's matmuls and convolutions compute in bf16 under autocast
  either way, so (a)'s frozen bf16 base changes what the network computes only through the weights
  autocast does not cast itself (normalisation weights, rounded to bf16) and the backward kernels
  (bf16 against mixed-dtype ones). Here the random UNet's normalisation weights are 1 and 0, exact
  in bf16, so the loss equals (b)'s; `tests/sd/test_sd_lora_mixed_precision.py` perturbs them and
  measures the difference to a float32 base (tiny UNet, 3 steps: first loss 0.18 % apart, first
  LoRA gradients 9 %, of which 0.7 % are the kernels alone). A float32 base also made autocast
  save a bf16 cast of each frozen weight for the backward pass, which a bf16 base does not need.
- **Does an SDXL LoRA distillation fit a 24 GB card? Not measured on a GPU; estimated below.**

## SDXL on a 24 GB card: an estimate, not a measurement

Activations saved for backward by the LoRA student's forward, counted on the meta device (no
memory): every tensor autograd saves, once per base tensor, parameters excluded, attention
counted as flash attention saves it (q, k, v, output, logsumexp; a stand-in for
`scaled_dot_product_attention`, since the meta device would take the math path and save the
attention matrix). "bf16" is the whole UNet in bf16, the closer figure for `mixed_precision: bf16`
(under autocast some saved tensors stay float32, so it is no bound); "float32" is what a run
without mixed precision saves.

{saved}

With `mixed_precision: bf16`, one network, batch 1 at 1024 px (128 x 128 latents), no gradient
checkpointing:

- weights (bf16 base, float32 LoRA), LoRA gradients, AdamW state, EMA: {sdxl_now} (exact, first
  table; with the float32 base of before it was {sdxl_before}, plus up to 2 bytes x the base
  parameters of bf16 weight casts saved for backward);
- saved activations: {act_low} (bf16 count) to {act_high} (float32 count).

Together {low} (bf16 count) to {high} (float32 count), against the card's {card} (24 GB), before
the backward pass's temporaries, the CUDA context and the allocator's slack; scaling the bf16 count
by the {factor} x measured on SD1.5 with bf16 above (step peak over static bytes, per byte of the
bf16 count) gives {scaled}. So an SDXL LoRA distillation as proreflow runs it now {fits} a 24 GB
card without `gradient_checkpointing: true` (an estimate from a 256 px CPU step, whose fixed costs
weigh more than at 1024 px). With gradient checkpointing (recipe key) the forward keeps only each
block's inputs and the backward pass recomputes one block at a time, so the static {sdxl_now} plus
much smaller activations remain; that case is not counted here. All of this has to be confirmed by
a measurement on the card (`torch.cuda.max_memory_allocated`).
"""


if __name__ == "__main__":
    sys.exit(main())
