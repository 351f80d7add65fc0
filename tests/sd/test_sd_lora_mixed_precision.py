"""A LoRA student that is its own teacher, under bf16 mixed precision: the frozen base (the teacher's
weights) lives in bf16, only the LoRA parameters (and their optimiser state, EMA) in float32.

Training equals the two-copy run whose float32 base is rounded to bf16 (so the bf16 base is the only
change), resume is exact, the run's files hold the float32 LoRA weights alone, exports take the float32
base from the teacher, and the target cache's teacher digest hashes the bf16 bytes the teacher runs with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil

import pytest
import torch
from safetensors.torch import load_file

from proreflow import Denoiser
from proreflow.sd.export import export_lora, export_pipeline, load_run_student
from proreflow.sd.pipeline import load_teacher, unet_network
from proreflow.sd.setup import build_sd_setup
from proreflow.training import StageRunner, train
from proreflow.training import stage_runner as runner_module
from proreflow.training.target_cache import tensor_bytes, weights_digest

STAGE = {"windows": 2, "steps": 3, "batch_size": 2, "lr": 1e-3, "solver_steps": 2, "guidance": 2.0}
RECIPE = {"name": "tiny", "checkpoint_every": 0, "log_every": 1, "seed": 3, "mixed_precision": "bf16",
          "stages": [STAGE]}


def lora_setup(sd15_dir, image_dir, two_copies: bool = False, state=None):
    setup = build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), device="cpu", lora_rank=4)
    if state is not None:
        setup.teacher_model.load_state_dict(state)
    return dataclasses.replace(setup, teacher_view=None) if two_copies else setup


def perturbed_state(sd15_dir, image_dir):
    """The adapted tiny UNet's weights with normalisation weights off 1 / 0, so that rounding them to bf16
    (where autocast computes in float32) changes the network; the same random LoRA A for every setup."""
    unet = lora_setup(sd15_dir, image_dir).teacher_model
    torch.manual_seed(11)
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))
    return {k: v.clone() for k, v in unet.state_dict().items()}


def run_steps(setup, steps: int = 3):
    """Losses, LoRA weights, EMA and the first step's LoRA gradients (one vector) of ``steps`` steps."""
    with StageRunner(RECIPE, setup) as runner:
        grads = {}

        def keep(name):
            def hook(p):
                if name not in grads:  # the first step's
                    grads[name] = p.grad.clone()
            return hook
        hooks = [p.register_post_accumulate_grad_hook(keep(name))
                 for name, p in runner.module.named_parameters() if p.requires_grad]
        losses = [runner.step().loss for _ in range(steps)]
        for hook in hooks:
            hook.remove()
        lora = {k: v.detach().clone() for k, v in runner.module.state_dict().items() if "lora_" in k}
        ema = {k: v.clone() for k, v in runner.ema.tensors().items()}
        return losses, lora, ema, runner, torch.cat([grads[k].flatten() for k in sorted(grads)])


def test_the_bf16_base_changes_training_by_the_rounding_of_the_base_alone(sd15_dir, image_dir, monkeypatch):
    """Against the engine without the cast (the float32 base of before, ``cast_frozen`` switched off). On a
    float32 base holding the bf16-rounded values the forward is the same (first loss equal exactly; the
    backward differs by bf16 against mixed-dtype kernels); on the float32 base as loaded the difference is
    that of rounding the base (normalisation weights, where CPU autocast computes with the weights; the
    LoRA gradients at B = 0 scale with the residual target - prediction, which the rounding moves most)."""
    state = perturbed_state(sd15_dir, image_dir)
    rounded = {k: v if "lora_" in k else v.bfloat16().float() for k, v in state.items()}
    one = run_steps(lora_setup(sd15_dir, image_dir, state=state))
    runner = one[3]
    frozen = {p.dtype for p in runner.module.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in runner.module.parameters() if p.requires_grad}
    moments = {t.dtype for s in runner.optimizer.state.values() for t in s.values() if t.ndim}
    assert frozen == {torch.bfloat16} and trainable == moments == {torch.float32}
    assert {v.dtype for v in one[2].values()} == {torch.float32}  # the EMA

    monkeypatch.setattr(runner_module, "cast_frozen", lambda module, dtype: None)
    same = run_steps(lora_setup(sd15_dir, image_dir, state=rounded))  # float32 base, bf16-rounded values
    float32 = run_steps(lora_setup(sd15_dir, image_dir, state=state))  # float32 base as loaded
    assert {p.dtype for p in float32[3].module.parameters()} == {torch.float32}
    gaps = {}
    for name, other in (("same", same), ("float32", float32)):
        gaps[name] = (abs(one[0][0] - other[0][0]) / abs(other[0][0]),  # the first step's loss
                      float((one[4] - other[4]).norm() / other[4].norm()),  # its LoRA gradients
                      max(abs(a - b) / abs(b) for a, b in zip(one[0], other[0])))  # the losses of 3 steps
    # measured: same (0, 0.0066, 0.00046), float32 (0.0018, 0.094, 0.0018)
    assert one[0][0] == same[0][0]  # the first step's loss (before any update): the same forward, exactly
    assert gaps["same"][1] < 0.02 and gaps["same"][2] < 1e-3, gaps  # bf16 kernels vs mixed-dtype ones
    assert 0 < gaps["float32"][0] < 1e-2 and 0 < gaps["float32"][1] < 0.2 and gaps["float32"][2] < 1e-2, gaps


RUN = {"name": "tiny", "checkpoint_every": 2, "keep_checkpoints": 0, "log_every": 1, "seed": 3,
       "mixed_precision": "bf16", "defaults": {"batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "ema_decay": 0.5},
       "stages": [{"windows": 2, "steps": 4, "solver_steps": 2, "guidance": 2.0},
                  {"windows": 1, "steps": 2, "teacher": "previous"}]}
FILES = ("student.safetensors", "stage-1-2w/ema.safetensors", "stage-2-1w/ema.safetensors")


@pytest.fixture(scope="module")
def bf16_run(sd15_dir, image_dir, tmp_path_factory):
    """Two stages of a LoRA run under bf16, with checkpoints every 2 steps (all kept)."""
    out = tmp_path_factory.mktemp("bf16-lora") / "run"
    result = train(RUN, build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), device="cpu", lora_rank=4), out,
                   progress=False)
    return out, result


def test_bf16_lora_run_saves_float32_lora_weights_and_resumes_exactly(bf16_run, sd15_dir, image_dir, tmp_path):
    bf16_run, _ = bf16_run
    unet = load_teacher(sd15_dir).unet
    for name in (*FILES, "checkpoints/step-00000002/student.safetensors",
                 "checkpoints/step-00000002/ema.safetensors"):
        saved = load_file(bf16_run / name)  # the LoRA weights alone (the base is the teacher's), float32
        assert saved and all("lora_" in k for k in saved) and {v.dtype for v in saved.values()} == {torch.float32}
    final = load_file(bf16_run / "student.safetensors")
    assert len(final) == sum("lora_" in n for n, _ in load_run_student(bf16_run, unet)[0].named_parameters())

    for resume_from in ("2", "4"):  # mid-stage 1; the end of stage 1 (stage 2 starts from its file)
        out = tmp_path / f"from-{resume_from}"
        shutil.copytree(bf16_run, out)
        setup = build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), device="cpu", lora_rank=4)
        train(RUN, setup, out, resume=resume_from, progress=False)  # a fresh float32 teacher, cast again
        for name in FILES:
            want, got = load_file(bf16_run / name), load_file(out / name)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name


def merged_by_hand(base: dict, lora: dict, scale: float) -> dict:
    """``W + scale * B A`` for every LoRA target of ``base`` (float32 state dicts of the plain UNet)."""
    merged = dict(base)
    for key, a in lora.items():
        if ".lora_A." in key:
            layer = key.split(".lora_A.")[0]
            b = lora[key.replace(".lora_A.", ".lora_B.")]
            merged[f"{layer}.weight"] = base[f"{layer}.weight"] + scale * (b @ a)
    return merged


def test_exports_of_a_bf16_lora_run_use_the_float32_base(bf16_run, sd15_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    bf16_run, result = bf16_run
    teacher = load_teacher(sd15_dir)
    base = {k: v.clone() for k, v in teacher.unet.state_dict().items()}
    student, info = load_run_student(bf16_run, teacher.unet)
    trained = load_file(bf16_run / "student.safetensors")
    # the run's own result (bf16 base) samples without autocast, like the float32 student up to bf16 rounding
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8]), teacher.encode_prompts(["a cat", "a dog"])
    float32 = Denoiser(unet_network(student), teacher.prediction_type, teacher.schedule)
    with torch.no_grad():
        got, want = result.student.predict(x, t, cond), float32.predict(x, t, cond)
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)  # measured: 0.016 at outputs up to 1.1

    path, kept = export_lora(student, teacher, tmp_path / "lora", info["windows"])
    exported = load_file(path)  # diffusers' keys: unet.<module>.lora_A.weight
    assert kept == 1.0 and len(exported) == len(trained)
    for key, value in trained.items():
        assert torch.equal(exported["unet." + key.replace(".default", "")], value)  # float32, as trained

    export_pipeline(student, teacher, tmp_path / "pipe", info["windows"])
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "pipe" / "unet")
    lora = {k.replace(".default", ""): v for k, v in trained.items()}
    want = merged_by_hand(base, lora, scale=1.0)  # lora_alpha = rank = 4
    got = unet.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
        if not any(key == f"{layer}.weight" for layer in {k.split(".lora_A.")[0] for k in lora if ".lora_A." in k}):
            assert torch.equal(got[key], base[key])  # the teacher's float32 weights, not a bf16 copy
    rounded = [k for k, v in base.items() if v.is_floating_point() and not torch.equal(v.bfloat16().float(), v)]
    assert rounded  # so the equalities above would fail had the bf16 base been merged


def digest_of(tensors: dict) -> str:
    digest = hashlib.blake2b(digest_size=10)
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def test_target_cache_digest_hashes_the_bf16_base_the_teacher_runs_with(sd15_dir, image_dir):
    base = {k: v.clone() for k, v in lora_setup(sd15_dir, image_dir).teacher_model.state_dict().items()
            if "lora_" not in k}
    digests = {}
    for precision in ("no", "bf16"):
        recipe = {**RECIPE, "mixed_precision": precision}
        with StageRunner(recipe, lora_setup(sd15_dir, image_dir)) as runner:
            digests[precision] = weights_digest(runner.context.setup.teacher_tensors())
            runner.step()  # the LoRA layers train: the teacher's digest stays
            assert weights_digest(runner.context.setup.teacher_tensors()) == digests[precision]
    assert digests["no"] == digest_of(base)
    assert digests["bf16"] == digest_of({k: v.bfloat16() for k, v in base.items()})  # other bytes: another key
