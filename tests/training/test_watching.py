"""Watching a run (issue 14, item 6): validation grids of fixed noise, accelerate's trackers, the log file
and the console, each checked against what it must equal."""

from __future__ import annotations

import logging
import shutil
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers.engine_toys import CLASSES, CtrlCAt, Mixture, make_setup, tiny_recipe
from PIL import Image
from safetensors.torch import load_file

from proreflow import TimeWindows, sample
from proreflow.training import load_student, train
from proreflow.training.progressive import TrainingInterrupted
from proreflow.training.recipes import Recipe, RecipeError
from proreflow.training.report import LOG_FILE
from proreflow.training.validation import grid_image, to_uint8, validation_noise

VALIDATING = {"validation_every": 2, "validation_samples": 5, "checkpoint_every": 2, "keep_checkpoints": 0}


def _grids(out: Path) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
    found = {}
    for png in sorted((out / "validation").rglob("*.png")):
        samples = load_file(str(png.with_suffix(".safetensors")))["samples"]
        found[str(png.relative_to(out))] = (np.asarray(Image.open(png)), samples)
    return found


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    out = tmp_path_factory.mktemp("validated") / "run"
    return out, train(tiny_recipe(**VALIDATING), make_setup(), out, progress=False)


def test_validation_changes_nothing_of_the_training(validated, tmp_path):
    out, result = validated
    plain = train(tiny_recipe(checkpoint_every=2, keep_checkpoints=0), make_setup(), tmp_path, progress=False)
    assert result.history == plain.history
    for key, value in plain.module.state_dict().items():
        assert torch.equal(result.module.state_dict()[key], value)


def test_a_grid_every_n_steps_and_at_each_stage_end(validated):
    out, _ = validated
    assert sorted(_grids(out)) == [f"validation/stage-{s}/step-{g:08d}.png" for s, steps in
                                   (("1-4w", (2, 4, 6)), ("2-2w", (8, 10, 12))) for g in steps]


def test_the_stage_end_grid_samples_the_stage_result_from_the_fixed_noise(validated):
    """The last grid of a stage is the saved stage student sampled one step per window from
    validation_noise(seed), for the conditions of the dataset's first items."""
    out, _ = validated
    setup = make_setup()
    conds = torch.stack([setup.dataset[i][1] for i in range(5)])
    noise = validation_noise(0, (5, 2), torch.float64)
    for stage, windows, step in ((1, 4, 6), (2, 2, 12)):
        student, _ = load_student(out, setup, stage=stage)
        want = sample(student, noise, TimeWindows(windows), windows, conds, torch.tensor([CLASSES]), 1.0)
        got = load_file(str(out / f"validation/stage-{stage}-{windows}w/step-{step:08d}.safetensors"))["samples"]
        assert torch.equal(got, want.float())
    first = load_file(str(out / "validation/stage-1-4w/step-00000002.safetensors"))["samples"]
    assert not torch.equal(first, load_file(str(out / "validation/stage-1-4w/step-00000006.safetensors"))["samples"])


def test_cfg_sync_grids_are_sampled_with_the_stage_guidance(tmp_path):
    recipe = tiny_recipe(validation_every=6, validation_samples=4, stages=[
        {"windows": 2, "guidance_mode": "cfg_sync", "guidance": 3.0, "cond_dropout": 0.2}])
    setup = make_setup()
    train(recipe, setup, tmp_path, progress=False)
    student, _ = load_student(tmp_path, setup)
    conds = torch.stack([setup.dataset[i][1] for i in range(4)])
    noise = validation_noise(0, (4, 2), torch.float64)
    got = load_file(str(tmp_path / "validation/stage-1-2w/step-00000006.safetensors"))["samples"]
    guided = sample(student, noise, TimeWindows(2), 2, conds, torch.tensor([CLASSES]), 3.0)
    assert torch.equal(got, guided.float())
    assert not torch.equal(got, sample(student, noise, TimeWindows(2), 2, conds).float())


def test_resumed_runs_draw_the_same_grids(validated, tmp_path):
    """Resumed from step 4 (the later grids deleted), the run draws every later grid as the uninterrupted one."""
    out, _ = validated
    run = tmp_path / "run"
    shutil.copytree(out, run)
    for path in (run / "validation").rglob("step-*"):
        if int(path.stem.removeprefix("step-")) > 4:
            path.unlink()
    train(tiny_recipe(**VALIDATING), make_setup(), run, resume="step-00000004", progress=False)
    want, got = _grids(out), _grids(run)
    assert sorted(got) == sorted(want)
    for name, (image, samples) in want.items():
        assert np.array_equal(got[name][0], image) and torch.equal(got[name][1], samples), name


def test_image_grids_show_the_pixels():
    """Cells of an image grid are the samples mapped by round((x + 1) 127.5), enlarged by whole pixels."""
    assert to_uint8(torch.tensor([-1.0, -0.5, 0.0, 1.0, 3.0]).reshape(1, 1, 1, 5)).tolist() == [
        [[[0, 64, 128, 255, 255]]] * 3]  # 63.75 rounds to 64, 127.5 to 128 (half to even), 3 clamps to 1
    samples = torch.rand(3, 1, 8, 8) * 2 - 1
    grid = grid_image(samples, ["a", "b", "c"])
    scale = 12  # cells of at least 96 px: 8 px images enlarged 12 times
    assert grid.shape == (4 + 8 * scale + 12 + 8, 3 * (8 * scale + 4) + 4, 3)  # one row of 3 labelled cells
    for i in range(3):
        x = 4 + i * (8 * scale + 4)
        cell = grid[4: 4 + 8 * scale: scale, x: x + 8 * scale: scale, 0]
        assert np.array_equal(cell, to_uint8(samples[i:i + 1])[0, 0].numpy())
    decoded = grid_image(torch.zeros(2, 4), ["a", "b"], decode=lambda z: z.reshape(2, 1, 2, 2))
    assert decoded[4, 4, 0] == 128
    assert grid_image(torch.zeros(2, 5), ["a", "b"]) is None  # neither images nor 2D points


def test_trackers_get_the_scalars_and_the_grids(tmp_path):
    """report_to: tensorboard: accelerate's TensorBoard tracker holds train/loss at every log_every step
    (the loss history's values) and the validation grids as images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(tiny_recipe(report_to="tensorboard", log_every=2, validation_every=3), make_setup(), tmp_path,
                   progress=False)
    events = EventAccumulator(str(tmp_path / "tensorboard" / "tiny"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    history = dict(result.history)
    assert sorted(loss) == [2, 4, 6, 8, 10, 12]
    assert all(value == pytest.approx(history[step], rel=1e-6) for step, value in loss.items())
    assert [e.step for e in events.Images("validation/stage-1-4w")] == [3, 6]
    assert [e.step for e in events.Images("validation/stage-2-2w")] == [9, 12]
    png = Image.open(tmp_path / "validation/stage-1-4w/step-00000003.png")
    assert (events.Images("validation/stage-1-4w")[0].width, events.Images("validation/stage-1-4w")[0].height) \
        == png.size
    text = events.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert yaml.safe_load(textwrap.dedent(text)) == yaml.safe_load((tmp_path / "recipe.yaml").read_text())


def test_each_launch_is_one_tensorboard_run(tmp_path):
    """A launch and its resume log into the one run folder OUT/tensorboard/NAME, nothing beside it (accelerate's
    hparams store opened a second, empty run per launch)."""
    recipe = tiny_recipe(report_to="tensorboard")
    setup = make_setup()
    setup.dataset = CtrlCAt(8 * 3)  # Ctrl-C in step 3 (batch 8)
    with pytest.raises(TrainingInterrupted):
        train(recipe, setup, tmp_path, progress=False)
    train(recipe, make_setup(), tmp_path, resume=True, progress=False)
    folders = [p.relative_to(tmp_path / "tensorboard") for p in (tmp_path / "tensorboard").rglob("*") if p.is_dir()]
    assert folders == [Path("tiny")]


def test_the_log_file_holds_every_line(tmp_path):
    result = train(tiny_recipe(log_every=2), make_setup(), tmp_path, progress=False)
    lines = (tmp_path / LOG_FILE).read_text().splitlines()
    steps = [line for line in lines if " step " in line and "(global " in line]
    assert len(steps) == 6 and "stage 1/2 (4w) step 2/6 (global 2): loss " in steps[0]
    assert f"loss {dict(result.history)[2]:.5g} " in steps[0] and " lr 0.001 " in steps[0]
    assert sum("stage 1/2 (4 windows, teacher: original): 6 steps" in line for line in lines) == 1
    train(tiny_recipe(log_every=2), make_setup(), tmp_path, resume=True, progress=False)
    resumed = (tmp_path / LOG_FILE).read_text().splitlines()
    assert resumed[: len(lines)] == lines and any(f"run in {tmp_path} is finished" in line  # nothing to train
                                                  for line in resumed[len(lines):])
    assert not logging.getLogger("proreflow").handlers  # the file handler went with the run


def test_no_progress_prints_log_lines_on_stdout(tmp_path, capsys):
    import yaml

    from proreflow.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"setup": {"name": "helpers.engine_toys:make_setup"}, **tiny_recipe(log_every=3)}))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    steps = [line for line in captured.out.splitlines() if "(global " in line]
    assert [line.split(" (global ")[0].split(" INFO ")[1] for line in steps] == [
        "stage 1/2 (4w) step 3/6", "stage 1/2 (4w) step 6/6", "stage 2/2 (2w) step 3/6", "stage 2/2 (2w) step 6/6"]
    assert "stage 2/2 (2 windows, teacher: previous): 6 steps" in captured.out and captured.err == ""


class Warning3(Mixture):
    """Item 3 warns twice when read: through logging (a library's logger) and through warnings."""

    def __getitem__(self, i):
        if i == 3:
            logging.getLogger("some.library").warning("item 3 looks odd")
            warnings.warn("item 3 is deprecated", UserWarning, stacklevel=1)
        return super().__getitem__(i)


def test_warnings_are_written_above_the_progress_bar(tmp_path, capsys, monkeypatch):
    """With progress bars, log records and Python warnings go through tqdm.write (the bar stays whole),
    once each; after the run logging is as it was."""
    from proreflow.training import report

    written = []
    monkeypatch.setattr(report.tqdm, "write", lambda text, file=None, **kw: written.append(text))
    root_handlers = list(logging.getLogger().handlers)
    setup = make_setup()
    setup.dataset = Warning3(64)
    train(tiny_recipe(), setup, tmp_path, progress=True)
    assert sum("item 3 looks odd" in w for w in written) == sum("item 3 is deprecated" in w for w in written) > 0
    assert any("stage 1/2 (4 windows" in w for w in written)
    assert not any("(global " in w for w in written)  # the bar shows the step lines' numbers
    assert "item 3" not in capsys.readouterr().err  # nothing printed past the bar
    assert logging.getLogger().handlers == root_handlers
    log = (tmp_path / LOG_FILE).read_text()
    assert "stage 1/2 (4 windows" in log and "item 3" not in log  # the file holds proreflow's own records


def test_the_older_tensorboard_key_is_refused_with_its_new_spelling():
    for value in (True, False):
        with pytest.raises(RecipeError, match="tensorboard: the key is now report_to"):
            Recipe.from_dict({**tiny_recipe(), "tensorboard": value})


def test_a_checkpoint_of_an_older_run_with_the_tensorboard_key_resumes(tmp_path):
    import json

    train(tiny_recipe(checkpoint_every=2), make_setup(), tmp_path, progress=False)
    for sums in (tmp_path / "checkpoints").glob("step-*/checksums.json"):
        sums.unlink()  # an older run's checkpoints have none
    for meta in (tmp_path / "checkpoints").glob("step-*/meta.json"):
        data = json.loads(meta.read_text())
        data["recipe"].pop("report_to")
        data["recipe"]["tensorboard"] = False
        meta.write_text(json.dumps(data))
    train(tiny_recipe(checkpoint_every=2), make_setup(), tmp_path, resume=True, progress=False)
