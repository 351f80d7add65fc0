"""Ctrl-C writes a checkpoint and the run resumes bit-identically; a resume with changed
hyperparameters is refused unless allowed."""

from __future__ import annotations

import json
import signal

import pytest
import torch
import yaml
from helpers.engine_toys import CtrlCAt, SkippingMixture, make_setup, skipped_per_step, tiny_recipe
from safetensors.torch import load_file

from proreflow.cli import main
from proreflow.training import train
from proreflow.training.progressive import TrainingInterrupted
from proreflow.training.report import SKIPPED_NAMES_KEPT, StageSummary

RECIPE = tiny_recipe(checkpoint_every=4, keep_checkpoints=0,
                     defaults={"lr": 1e-2, "batch_size": 8, "steps": 6, "ema_decay": 0.8, "solver_steps": 2})


def _same(a, b) -> None:
    for name in ("student.safetensors", "stage-1-4w/ema.safetensors", "stage-2-2w/ema.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


@pytest.mark.parametrize("at_read, stopped", [(6 * 8 + 2 * 8 + 3, "stage 2, step 3"), (2, "stage 1, step 1")])
def test_ctrl_c_writes_a_checkpoint_and_resume_is_bit_identical(tmp_path, at_read, stopped):
    """Ctrl-C in the middle of a step: the step finishes, a checkpoint of it is written, and a resume
    ends where an uninterrupted run does."""
    straight = train(RECIPE, make_setup(), tmp_path / "straight", progress=False)
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a job started with '&'
    setup = make_setup()
    setup.dataset = CtrlCAt(at_read)
    with pytest.raises(TrainingInterrupted, match=rf"interrupted at {stopped}; newest checkpoint: .*step-") as err:
        train(RECIPE, setup, tmp_path / "run", progress=False)
    assert err.value.checkpoint.name == f"step-{int(stopped[6]) * 6 - 6 + int(stopped[-1]):08d}"
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    resumed = train(RECIPE, make_setup(), tmp_path / "run", resume=True, progress=False)
    _same(tmp_path / "run", tmp_path / "straight")
    assert resumed.history == straight.history


class SkippingCtrlCAt(CtrlCAt, SkippingMixture):
    """SkippingMixture's items, with Ctrl-C at read ``at`` as CtrlCAt (0: never)."""


def test_skipped_items_are_counted_per_stage_and_resume_exactly(tmp_path):
    """The stage summaries count every read of a skipped item (and name the first distinct ones),
    the same after a Ctrl-C in stage 2 and a resume as in one uninterrupted run."""
    straight_setup = make_setup()
    straight_setup.dataset = SkippingCtrlCAt(0)
    straight = train(RECIPE, straight_setup, tmp_path / "straight", progress=False)
    setup = make_setup()
    setup.dataset = SkippingCtrlCAt(6 * 8 + 2 * 8 + 3)
    with pytest.raises(TrainingInterrupted, match="interrupted at stage 2, step 3"):
        train(RECIPE, setup, tmp_path / "run", progress=False)
    resumed_setup = make_setup()
    resumed_setup.dataset = SkippingCtrlCAt(0)
    resumed = train(RECIPE, resumed_setup, tmp_path / "run", resume=True, progress=False)
    for stage, (a, b) in enumerate(zip(straight.stages, resumed.stages, strict=True)):
        gone = skipped_per_step(len(straight_setup.dataset), RECIPE["seed"], stage, 8, 6)
        assert a.skipped_items == b.skipped_items == len(gone) > 0
        assert a.skipped_item_names == b.skipped_item_names == list(dict.fromkeys(gone))[:SKIPPED_NAMES_KEPT]
        names = a.skipped_item_names
        distinct = len(set(gone))
        count = f"{distinct} items" if distinct < SKIPPED_NAMES_KEPT else f"{SKIPPED_NAMES_KEPT} or more items"
        assert f", {len(gone)} reads of damaged data skipped ({count}: {', '.join(names[:3])}, ...)" in a.line(2)
    repeated = StageSummary(1, 4, "original", 6, 0, 48, 96, 1.0, 0.1, skipped_items=3,
                            skipped_item_names=["a.png", "b.png"])  # 2 damaged files, one read twice
    assert repeated.line(1).endswith(", 3 reads of damaged data skipped (2 items: a.png, b.png)")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["skipped_items"] for s in summary] == [s.skipped_items for s in straight.stages]


def test_the_cli_prints_the_resume_command_on_ctrl_c(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"setup": {"name": "test_interrupt_and_resume:interrupting_setup"}, **RECIPE}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--no-progress"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("proreflow train: interrupted at stage 1, step 2; newest checkpoint: ")
    assert err[0].endswith(f"continue with: proreflow train --config {config} --out {out} --resume --no-progress")


def interrupting_setup():
    setup = make_setup()
    setup.dataset = CtrlCAt(8 + 3)
    return setup


@pytest.mark.parametrize("override, key", [("stages.*.lr=0.005", "stages.0.lr"), ("seed=3", "seed"),
                                           ("stages.1.alpha=0.5", "stages.1.alpha"),
                                           ("stages.*.lr_schedule=cosine", "stages.0.lr_schedule"),
                                           ("stages.*.adam_beta2=0.9", "stages.0.adam_beta2"),
                                           ("max_train_samples=5", "max_train_samples")])
def test_resume_with_changed_hyperparameters_is_refused_unless_allowed(tmp_path, override, key):
    from proreflow.training.recipes import load_recipe

    setup = make_setup()
    setup.dataset = CtrlCAt(3 * 8 + 1)
    with pytest.raises(TrainingInterrupted):
        train(RECIPE, setup, tmp_path, progress=False)
    changed = load_recipe(RECIPE, [override])
    with pytest.raises(ValueError, match=rf"^{key}: the checkpoint step-00000004 was trained with .*"
                                         r"--allow-recipe-change"):
        train(changed, make_setup(), tmp_path, resume=True, progress=False)
    quiet = load_recipe(RECIPE, ["log_every=5", "keep_checkpoints=3", "validation_every=2",  # keys that do
                                 "report_to=tensorboard"])                                  # not change weights
    with pytest.raises(TrainingInterrupted):
        setup.dataset = CtrlCAt(1 * 8 + 1)
        train(quiet, setup, tmp_path, resume=True, progress=False)
    result = train(changed, make_setup(), tmp_path, resume=True, progress=False, allow_recipe_change=True)
    assert len(result.history) == 12
