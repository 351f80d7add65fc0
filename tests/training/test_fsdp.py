"""FSDP2 through accelerate's FSDP plugin, 2 CPU processes (torchrun, gloo): the student sharded (every
parameter a DTensor, each element on one process), trained to the weights and validation samples of one
process with the same global batch, its checkpoints full tensors that resume under FSDP and on one process
without it.

accelerate ignores its FSDP plugin on CPU (it shards only GPU-like process groups), so the worker lets its
state take the plugin as on GPUs (``tests/helpers/fsdp_on_cpu.py``); the rest is accelerate's own FSDP2 code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.engine_toys import SkippingMixture, make_setup, tiny_recipe
from safetensors.torch import load_file, save_file

from proreflow.training import train

WORKER = Path(__file__).with_name("dist_worker.py")
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "Linear"}
"""What ``accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP
--fsdp_transformer_layer_cls_to_wrap Linear`` sets: each Linear layer its own FSDP unit, the rest the root's."""
# 2 processes x 2 accumulation steps x 2 samples = 8 a step, as 1 x 2 x 4; a teacher 'previous' in stage 2;
# checkpoints at global steps 3 and 9 (mid-stage: student, EMA and optimiser state), validation every 3 steps
RECIPE = tiny_recipe(checkpoint_every=3, keep_checkpoints=0, validation_every=3, validation_samples=6,
                     defaults={"lr": 1e-2, "batch_size": 8, "grad_accum": 2, "steps": 6, "ema_decay": 0.8,
                               "solver_steps": 2, "cond_dropout": 0.25})
FILES = ("student.safetensors", "stage-1-4w/ema.safetensors", "stage-2-2w/ema.safetensors")


def _launch(tmp_path: Path, out: str, *options: str) -> None:
    """The FSDP run of RECIPE on 2 processes into ``tmp_path / out``, from the teacher of ``make_setup()``."""
    teacher = tmp_path / "teacher.safetensors"
    if not teacher.exists():
        save_file(make_setup().teacher_model.state_dict(), str(teacher))
    env = {**os.environ, **FSDP_ENV, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(tmp_path / out), json.dumps(RECIPE), str(teacher), "fsdp_on_cpu=1", *options]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _one_process(out: Path, resume: str | bool = False):
    setup = make_setup()
    setup.dataset = SkippingMixture()
    return train(RECIPE, setup, out, resume=resume, progress=False)


def _assert_same(a_dir: Path, b_dir: Path, atol: float, names=FILES) -> None:
    for name in names:
        a, b = load_file(str(a_dir / name)), load_file(str(b_dir / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol)


@pytest.mark.distributed
def test_fsdp2_two_processes_shard_the_student_and_match_one(tmp_path):
    _launch(tmp_path, "two")
    teacher = make_setup().teacher_model
    numel = sum(p.numel() for p in teacher.parameters())
    records = [json.loads((tmp_path / f"two.fsdp-{rank}.json").read_text()) for rank in (0, 1)]
    for record in records:  # FSDP2 units: the three Linear layers and the root (embedding, rest)
        assert record["distributed_type"] == "FSDP" and record["fsdp_units"] == ["FSDPLinear"] * 3 + ["FSDPMLP"]
        assert record["dtensors"] == sorted(name for name, _ in teacher.named_parameters())
        assert record["numel"] == numel and 0 < record["local_numel"] < numel
    assert sum(r["local_numel"] for r in records) == numel  # each element on exactly one process

    one = _one_process(tmp_path / "one")
    _assert_same(tmp_path / "one", tmp_path / "two", atol=1e-9)  # float64: all-reduce rounding only
    runs = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two")]
    assert [s["teacher_evals"] for s in runs[1]] == [s["teacher_evals"] for s in runs[0]]
    assert [s["final_loss"] for s in runs[1]] == pytest.approx([s["final_loss"] for s in runs[0]], rel=1e-9)
    full = {k: v.shape for k, v in teacher.state_dict().items()}  # a checkpoint holds full tensors
    for name in ("student", "ema"):
        assert {k: v.shape for k, v in load_file(str(tmp_path / f"two/checkpoints/step-00000009/{name}.safetensors")
                                                 ).items()} == full
    validation = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one/validation").rglob("*.safetensors"))
    assert len(validation) == 4  # steps 3 and 6 of each stage (EMA, then the stage result)
    _assert_same(tmp_path / "one", tmp_path / "two", atol=1e-9, names=validation)
    for rank in (0, 1):  # the network train() returns: plain, with the full EMA weights, on every process
        result = load_file(str(tmp_path / f"two.result-{rank}.st"))
        for key, value in one.module.state_dict().items():
            torch.testing.assert_close(result[key], value, rtol=0, atol=1e-9)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_checkpoints_resume_under_fsdp_and_without_it(tmp_path):
    _launch(tmp_path, "two")
    # resumed under FSDP from the mid-stage-1 checkpoint: the uninterrupted FSDP run, bit for bit
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    _launch(tmp_path, "resumed", "resume=3")
    _assert_same(tmp_path / "two", tmp_path / "resumed", atol=0)
    # its stage-2 checkpoint resumed on one process without FSDP: the one-process run
    shutil.copytree(tmp_path / "two", tmp_path / "unsharded")
    _one_process(tmp_path / "unsharded", resume="9")
    _one_process(tmp_path / "one")
    _assert_same(tmp_path / "one", tmp_path / "unsharded", atol=1e-9)


def test_fsdp_asked_for_on_cpu_trains_as_without_it_and_says_so(tmp_path, monkeypatch):
    """``accelerate launch --use_fsdp`` on a machine without GPUs: accelerate trains unsharded; the run says so."""
    recipe = tiny_recipe(stages=[{"windows": 4, "steps": 3}])
    plain = train(recipe, make_setup(), tmp_path / "plain", progress=False)
    monkeypatch.delenv("FSDP_CPU_RAM_EFFICIENT_LOADING", raising=False)  # the plugin writes it: undone after
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    asked = train(recipe, make_setup(), tmp_path / "asked", progress=False)
    for key, value in plain.module.state_dict().items():
        torch.testing.assert_close(asked.module.state_dict()[key], value, rtol=0, atol=0)
    log = (tmp_path / "asked/train.log").read_text()
    assert "ACCELERATE_USE_FSDP is set, but accelerate shards only over several GPUs" in log
    assert "ACCELERATE_USE_FSDP" not in (tmp_path / "plain/train.log").read_text()


def test_fsdp_settings_the_engine_cannot_train_with_name_the_fix():
    from accelerate.utils import DistributedType

    from proreflow.training.environment import check_sharding

    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
    with pytest.raises(ValueError, match=r"FSDP version 1 is not supported: set fsdp_version: 2"):
        check_sharding(fsdp1, shared=False)
    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    with pytest.raises(ValueError, match="train it without FSDP"):
        check_sharding(fsdp2, shared=True)  # a LoRA student on the teacher's own network
    check_sharding(fsdp2, shared=False)
    check_sharding(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, is_fsdp2=False), shared=True)
