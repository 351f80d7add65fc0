"""``proreflow train``: config file, overrides, resume, errors and help."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from helpers.engine_toys import tiny_recipe

from proreflow.cli import main
from proreflow.training.recipes import Recipe, Stage


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"setup": {"name": "helpers.engine_toys:make_setup", "n": 32}, **tiny_recipe()}))
    return path


def test_train_from_a_config_with_overrides_and_resume(tmp_path, config, capsys):
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--out", str(out), "--no-progress", "stages.*.steps=3", "seed=4"]
    assert main(args) == 0
    assert "student: " in capsys.readouterr().out
    assert [s["steps"] for s in json.loads((out / "summary.json").read_text())] == [3, 3]
    assert Recipe.from_dict(yaml.safe_load((out / "recipe.yaml").read_text())).seed == 4
    assert main(args) == 2  # the folder holds a run
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--out", str(out), "--no-progress", "--resume",
                 "stages.*.steps=3", "seed=4"]) == 0


def test_errors_name_the_key(config, capsys):
    assert main(["train", "--config", str(config), "stages.0.windows=3"]) == 2
    assert "stages.1.windows: 2 windows cannot follow 3" in capsys.readouterr().err
    assert main(["train", "--config", "proreflow-i"]) == 2
    assert "no setup section" in capsys.readouterr().err
    assert main(["train", "--config", "proreflow-i", "setup.name=nope"]) == 2
    assert "unknown setup 'nope'" in capsys.readouterr().err


def test_print_config(config, capsys):
    assert main(["train", "--config", str(config), "--print-config", "defaults.lr=0.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["setup"]["n"] == 32 and printed["stages"][0]["lr"] == 0.5


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for option in ("--config", "--out", "--resume", "--resume-from", "--no-progress", "--print-config", "KEY=VALUE"):
        assert option in text
    for f in dataclasses.fields(Recipe) + dataclasses.fields(Stage):
        assert f"  {f.name} " in text
    assert "proreflow-1step" in text
