"""LoRA distillation with one network in memory: the teacher is the student with adapters disabled."""

from __future__ import annotations

import dataclasses

import torch

from proreflow.sd.lora import AdaptersDisabled
from proreflow.sd.pipeline import load_teacher
from proreflow.sd.setup import build_sd_setup
from proreflow.training import StageRunner

RECIPE = {"name": "tiny", "checkpoint_every": 0, "log_every": 1, "seed": 3,
          "stages": [{"windows": 2, "steps": 3, "batch_size": 2, "lr": 1e-3, "solver_steps": 2,
                      "guidance": 2.0}]}


def test_the_unet_with_adapters_disabled_is_the_base_unet_exactly(sd15_dir, image_dir):
    setup = build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), device="cpu", lora_rank=4)
    with torch.no_grad():
        for name, p in setup.teacher_model.named_parameters():
            if "lora_" in name:
                p.normal_()  # a trained LoRA changes the UNet's output...
    base = load_teacher(sd15_dir).unet.eval()
    x, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 32)
    view = setup.teacher_view(setup.teacher_model.train())
    with torch.no_grad():
        adapted = setup.teacher_model(x, 500.0, cond).sample
        assert not torch.allclose(adapted, base(x, 500.0, cond).sample)
        assert torch.equal(view(x, 500.0, cond).sample, base(x, 500.0, cond).sample)  # ...not its base
        assert torch.equal(setup.teacher_model(x, 500.0, cond).sample, adapted)  # adapters back on
    assert setup.teacher_model.training and isinstance(view, AdaptersDisabled)
    assert not list(view.parameters())  # a view, not a second set of weights


def _train(setup):
    runner = StageRunner(RECIPE, setup)
    losses = [runner.step().loss for _ in range(3)]
    lora = {k: v.detach().clone() for k, v in runner.module.state_dict().items() if "lora_" in k}
    return losses, lora, runner


def test_training_with_one_network_equals_training_with_two_copies(sd15_dir, image_dir):
    one = build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), device="cpu", lora_rank=4)
    two = dataclasses.replace(build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), device="cpu",
                                             lora_rank=4), teacher_view=None)
    two.teacher_model.load_state_dict(one.teacher_model.state_dict())  # the same random LoRA A init
    losses_one, lora_one, runner_one = _train(one)
    losses_two, lora_two, runner_two = _train(two)
    assert runner_one.module is one.teacher_model and runner_two.module is not two.teacher_model
    assert runner_one.original.unet is runner_one.module  # the teacher is a view of the student
    torch.testing.assert_close(losses_one, losses_two, rtol=1e-5, atol=1e-6)
    assert lora_one.keys() == lora_two.keys() and lora_one
    for k in lora_one:
        torch.testing.assert_close(lora_one[k], lora_two[k], rtol=1e-5, atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in lora_one.items() if "lora_B" in k)  # it trained
    count = sum(p.numel() for p in runner_two.module.parameters())
    assert sum(p.numel() for p in runner_one.module.parameters()) == count
    assert sum(p.numel() for p in runner_one.original.parameters()) == 0
    assert sum(p.numel() for p in runner_two.original.parameters()) == count  # a second copy
