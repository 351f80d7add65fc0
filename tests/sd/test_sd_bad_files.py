"""Damaged or foreign files given to the Stable Diffusion commands (found by the fault campaign,
``benchmarks/faults.py``): one line naming the file, exit code 2 for a file the user names, 1 for a run's own
damaged file or an environment failure; nothing half-written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from proreflow.cli import main as cli


@pytest.fixture(scope="module")
def run_and_export(sd15_dir, image_dir, tmp_path_factory):
    from proreflow.sd.setup import build_sd_setup
    from proreflow.training import train

    root = tmp_path_factory.mktemp("bad-files")
    setup = build_sd_setup(teacher=str(sd15_dir), data=str(image_dir), device="cpu")
    recipe = {"name": "tiny", "checkpoint_every": 0, "stages": [{"windows": 2, "steps": 1, "batch_size": 2}]}
    train(recipe, setup, root / "run", progress=False)
    assert cli(["export", "--run", str(root / "run"), "--out", str(root / "export")]) == 0
    return root / "run", root / "export"


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / folder.name)


def _one_line(capsys) -> str:
    """The one line on stderr besides diffusers' loading bars."""
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()
    lines = [line for line in err if line.strip() and "%|" not in line]
    assert len(lines) == 1 and "Traceback" not in lines[0], err
    return lines[0]


def _sample(model, tmp_path) -> list[str]:
    return ["sample", "--model", str(model), "--prompt", "a cat", "--steps", "2", "--out", str(tmp_path / "png")]


def test_a_model_index_that_is_not_an_object_is_one_line(run_and_export, tmp_path, capsys):
    export = _copy(run_and_export[1], tmp_path)
    (export / "model_index.json").write_text("[1, 2]")
    assert cli(_sample(export, tmp_path)) == 2
    assert "model_index.json is not a diffusers model index" in _one_line(capsys)


def test_non_finite_weights_of_a_model_are_refused_before_sampling(run_and_export, tmp_path, capsys):
    export = _copy(run_and_export[1], tmp_path)
    weights = export / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert cli(_sample(export, tmp_path)) == 2
    line = _one_line(capsys)
    assert f"unet: {name} holds {tensors[name].numel()} non-finite value(s)" in line and "damaged" in line
    assert not (tmp_path / "png").exists()


@pytest.mark.parametrize("content", ['{"settings": {}}', "{{", '{"results": [1, 2]}'])
def test_export_eval_folder_without_results_is_one_line(run_and_export, tmp_path, capsys, content):
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "results.json").write_text(content)
    args = ["export", "--run", str(run_and_export[0]), "--out", str(tmp_path / "out"), "--eval", str(tmp_path / "ev")]
    assert cli(args) == 2
    assert "is not the results file of a `proreflow eval` run" in _one_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("windows", [-1, 0, "two", True, 100000])
def test_a_student_record_with_an_impossible_window_count_is_refused(run_and_export, tmp_path, capsys, windows):
    run = _copy(run_and_export[0], tmp_path)
    info = json.loads((run / "student.json").read_text())
    (run / "student.json").write_text(json.dumps({**info, "windows": windows}))
    assert cli(["export", "--run", str(run), "--out", str(tmp_path / "out")]) == 2
    assert f"windows is {windows!r}, not a count of 1 to 1024" in _one_line(capsys)


def test_a_damaged_student_of_a_run_is_a_run_time_failure(run_and_export, tmp_path, capsys):
    run = _copy(run_and_export[0], tmp_path)
    data = (run / "student.safetensors").read_bytes()
    (run / "student.safetensors").write_bytes(data[: len(data) // 2])
    assert cli(["export", "--run", str(run), "--out", str(tmp_path / "out")]) == 1
    assert _one_line(capsys).startswith(f"proreflow export: the run's student {run / 'student.safetensors'} is "
                                        "unreadable")
    assert not (tmp_path / "out").exists()


def test_an_upload_that_fails_keeps_the_export_and_exits_1(run_and_export, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    assert cli(["export", "--run", str(run_and_export[0]), "--out", str(out), "--push-to-hub", "me/tiny"]) == 1
    line = _one_line(capsys)
    assert line.startswith(f"proreflow export: the export is written to {out}; uploading it to me/tiny failed")
    assert (out / "model_index.json").is_file()


def test_a_component_folder_the_index_names_but_lacks_is_one_line(run_and_export, tmp_path, capsys):
    """diffusers would load a stand-in tokenizer (of another length) and fail deep in the text encoding."""
    export = _copy(run_and_export[1], tmp_path)
    shutil.rmtree(export / "tokenizer")
    assert cli(_sample(export, tmp_path)) == 2
    assert "lacks the folder(s) tokenizer its model_index.json names" in _one_line(capsys)
