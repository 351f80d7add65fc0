"""The training comforts of diffusers' example scripts (issue 14, item 7): learning-rate schedules by
name, Adam betas / epsilon, 8-bit Adam, TF32, max_train_samples, gradient checkpointing and resuming
from a named checkpoint, each checked against what it must equal."""

from __future__ import annotations

import copy
import importlib.machinery
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers.engine_toys import MLP, make_setup, tiny_recipe
from torch import nn

from proreflow.builtin.networks import MLPDenoiser
from proreflow.training import StageRunner, train
from proreflow.training.checkpoint import CheckpointError
from proreflow.training.optim import make_optimizer, set_stage_hyperparameters
from proreflow.training.recipes import LR_SCHEDULES, Stage

BEFORE = Path(__file__).parent / "data" / "tiny_run_reference.json"  # the toy run as recorded at commit 195cee4


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_default_recipe_trains_as_before_these_changes(tmp_path):
    """tiny_recipe (default lr_schedule, optimiser, ...) reproduces the loss history and weights stored
    from a run of the code before issue 14's items 6-7 (float64 toy)."""
    before = json.loads(BEFORE.read_text())
    result = train(tiny_recipe(), make_setup(), tmp_path, progress=False)
    assert [step for step, _ in result.history] == [step for step, _ in before["history"]]
    for (_, loss), (_, old) in zip(result.history, before["history"]):
        assert loss == pytest.approx(old, rel=1e-12, abs=1e-15)
    for key, value in result.module.state_dict().items():
        torch.testing.assert_close(value, torch.tensor(before["weights"][key], dtype=value.dtype), rtol=1e-12,
                                   atol=1e-14)


@pytest.mark.parametrize("name", LR_SCHEDULES)
def test_a_named_schedule_runs_step_k_at_diffusers_rate_after_k_steps(name):
    """Step k of the stage runs at the rate diffusers' get_scheduler(name) holds after k scheduler steps
    (optimiser of the same lr; 10 steps, 3 of warm-up, 2 restarts, power 2)."""
    from diffusers.optimization import get_scheduler

    lr, steps = 5e-3, 10
    recipe = tiny_recipe(stages=[{"windows": 2, "steps": steps, "lr": lr, "lr_schedule": name, "warmup_steps": 3,
                                  "lr_num_cycles": 2, "lr_power": 2.0}])
    with StageRunner(recipe, make_setup()) as runner:
        ours = [runner.step().scalars["lr"] for _ in range(steps)]
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=3, num_training_steps=steps, num_cycles=2, power=2.0)
    theirs = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        theirs.append(scheduler.get_last_lr()[0])
    assert ours == theirs
    if name not in ("constant", "constant_with_warmup"):
        assert len(set(ours)) > 3  # the schedule moved


def test_adam_betas_and_epsilon_give_torch_adamw_with_them():
    """An optimiser step with the stage's betas / eps equals torch's AdamW built with them, on the same gradients."""
    stage = Stage(windows=2, lr=0.01, weight_decay=0.1, adam_beta1=0.5, adam_beta2=0.7, adam_epsilon=1e-2)
    torch.manual_seed(0)
    ours_net = nn.Linear(3, 2).double()
    ref_net = copy.deepcopy(ours_net)
    ours = make_optimizer(ours_net)
    ref = torch.optim.AdamW(ref_net.parameters(), lr=0.01, betas=(0.5, 0.7), eps=1e-2, weight_decay=0.1)
    x = torch.randn(4, 3, dtype=torch.float64)
    for step in (1, 2, 3):
        set_stage_hyperparameters(ours, stage, step)
        for net, opt in ((ours_net, ours), (ref_net, ref)):
            opt.zero_grad()
            net(x * step).pow(2).sum().backward()
            opt.step()
    _assert_same_weights(_weights(ours_net), _weights(ref_net))
    default = copy.deepcopy(ref_net)
    opt = make_optimizer(default)
    set_stage_hyperparameters(opt, Stage(windows=2, lr=0.01, weight_decay=0.1), 1)
    default(x).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(default.weight, ref_net.weight)  # the settings do change the step


def test_adamw_8bit_is_bitsandbytes_adamw8bit(monkeypatch):
    """optimizer: adamw_8bit makes bitsandbytes.optim.AdamW8bit over the trainable parameters (a stand-in
    module here: bitsandbytes is not installed on this machine), with the stage's settings."""
    made = []

    class AdamW8bit(torch.optim.AdamW):
        def __init__(self, params):
            super().__init__(params)
            made.append(self)

    fake = types.ModuleType("bitsandbytes")
    fake.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", None)
    fake.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    recipe = tiny_recipe(optimizer="adamw_8bit", stages=[{"windows": 2, "steps": 2, "adam_beta1": 0.6}])
    with StageRunner(recipe, make_setup()) as runner:
        runner.run(2)
        assert made and runner.optimizer.optimizer is made[0]  # accelerate wraps it
        assert made[0].param_groups[0]["betas"] == (0.6, 0.999)


def test_adamw_8bit_without_bitsandbytes_is_a_clear_error(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "bitsandbytes" else real(name, *a, **k))
    with pytest.raises(ValueError, match=r"optimizer: 'adamw_8bit' needs bitsandbytes.*pip install bitsandbytes"):
        train(tiny_recipe(optimizer="adamw_8bit"), make_setup(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_allow_tf32_sets_torch_flags_and_changes_nothing_on_cpu(tmp_path):
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        tf32 = train(tiny_recipe(allow_tf32=True), make_setup(), tmp_path / "on", progress=False)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        plain = train(tiny_recipe(), make_setup(), tmp_path / "off", progress=False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    if not torch.cuda.is_available():
        assert tf32.history == plain.history
        _assert_same_weights(_weights(tf32.module), _weights(plain.module))


class Recording(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items, self.read = items, []

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.read.append(i)
        return self.items[i]


def test_max_train_samples_trains_on_exactly_the_first_items(tmp_path):
    """max_train_samples=5 reads only items 0..4 and trains exactly as a dataset of those 5 items does."""
    full = make_setup(64)
    full.dataset = Recording([full.dataset[i] for i in range(64)])
    first = make_setup(64)
    first.dataset = Recording([first.dataset[i] for i in range(5)])
    limited = train(tiny_recipe(max_train_samples=5), full, tmp_path / "limited", progress=False)
    alone = train(tiny_recipe(), first, tmp_path / "alone", progress=False)
    assert set(full.dataset.read) == set(range(5)) == set(first.dataset.read)
    assert limited.history == alone.history
    _assert_same_weights(_weights(limited.module), _weights(alone.module))
    bigger = train(tiny_recipe(max_train_samples=10**6), make_setup(64), tmp_path / "all", progress=False)
    assert bigger.history == train(tiny_recipe(), make_setup(64), tmp_path / "plain", progress=False).history


def test_gradient_checkpointing_gives_the_same_gradients_float64():
    """The built-in MLP recomputing each block in the backward pass gives the gradients of storing them."""
    torch.manual_seed(0)
    plain = MLPDenoiser((2,), num_classes=3, width=16, depth=3).double()
    nn.init.normal_(plain.out[-1].weight)  # the output layer starts at zero: make every gradient non-trivial
    checkpointed = copy.deepcopy(plain)
    checkpointed.enable_gradient_checkpointing()
    x, t, c = torch.randn(5, 2, dtype=torch.float64), torch.rand(5) * 999, torch.tensor([0, 1, 2, 3, 1])
    grads = []
    for net in (plain, checkpointed):
        net(x, t, c).pow(2).sum().backward()
        grads.append({name: p.grad.clone() for name, p in net.named_parameters()})
    assert all(g.abs().max() > 0 for g in grads[0].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-13, atol=1e-15)


def test_gradient_checkpointing_reaches_the_student_or_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"gradient_checkpointing: the student network \(MLP\) has no "
                                         r"enable_gradient_checkpointing\(\); set gradient_checkpointing: false"):
        train(tiny_recipe(gradient_checkpointing=True), make_setup(), tmp_path / "toy", progress=False)
    class Checkpointable(MLP):
        def enable_gradient_checkpointing(self):
            self.checkpointed = True

    setup = make_setup()
    setup.teacher_model = Checkpointable(0)
    with StageRunner(tiny_recipe(gradient_checkpointing=True), setup) as runner:
        assert getattr(runner.module, "checkpointed", False)  # on the student copy
    assert not hasattr(setup.teacher_model, "checkpointed")  # the frozen teacher keeps nothing to recompute


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted run that keeps every checkpoint (every 2 steps; stage ends at 6 and 12)."""
    out = tmp_path_factory.mktemp("full") / "run"
    result = train(tiny_recipe(checkpoint_every=2, keep_checkpoints=0), make_setup(), out, progress=False)
    return out, result


@pytest.mark.parametrize("name", ["step-00000004", "4", "step-00000008", "{path}"])
def test_resume_from_a_named_checkpoint_equals_the_uninterrupted_run(full_run, tmp_path, name):
    out, straight = full_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    name = name.format(path=run / "checkpoints" / "step-00000004")
    resumed = train(tiny_recipe(checkpoint_every=2, keep_checkpoints=0), make_setup(), run, resume=name,
                    progress=False)
    assert resumed.history == straight.history
    _assert_same_weights(_weights(resumed.module), _weights(straight.module))
    names = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert names == sorted(p.name for p in (out / "checkpoints").glob("step-*"))  # the later ones rewritten
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000012"


def test_resume_from_discards_the_later_checkpoints(full_run, tmp_path):
    out, _ = full_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    recipe = tiny_recipe(checkpoint_every=2, keep_checkpoints=0, stages=[{"windows": 4}, {"windows": 2,
                         "teacher": "previous", "solver_steps": None, "steps": 1}])  # stage 2 now 1 step
    train(recipe, make_setup(), run, resume="6", progress=False, allow_recipe_change=True)
    names = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert names == ["step-00000002", "step-00000004", "step-00000006", "step-00000007"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000007"


@pytest.mark.parametrize("name, message", [
    ("step-00000005", r"step-00000005 does not exist; checkpoints in .*: step-00000002, step-00000004"),
    ("/tmp/elsewhere/step-00000004", r"not a checkpoint of"),
    ("best", r"not a checkpoint of"),
])
def test_resume_from_an_absent_checkpoint_names_the_ones_there(full_run, tmp_path, name, message):
    out, _ = full_run
    with pytest.raises(CheckpointError, match=message):
        train(tiny_recipe(checkpoint_every=2, keep_checkpoints=0), make_setup(), out, resume=name, progress=False)
