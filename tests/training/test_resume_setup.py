"""A run records what it distills (issue 27 item 3): ``--resume`` with another setup (family, setup keys,
teacher, data) is refused unless --allow-recipe-change; runs written before the record resume as they
did; a finished run resumed says it is finished and trains nothing. Through the command line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from helpers.engine_toys import make_setup, tiny_recipe
from safetensors.torch import load_file

from proreflow.cli import main
from proreflow.training import train
from proreflow.training.setup import setup_identity

RECIPE = tiny_recipe(checkpoint_every=2, keep_checkpoints=0)


def relabelled_setup(n: int = 64):
    """The toy setup under another family name (a stand-in for another model family)."""
    return make_setup(n)


def _config(tmp_path, setup: dict) -> str:
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump({"setup": setup, **RECIPE}))
    return str(path)


def _train(capsys, config, out, *options) -> tuple[int, list[str], list[str]]:
    code = main(["train", "--config", config, "--out", str(out), "--no-progress", "--trust-setup-code", *options])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished CLI run of the toy setup with 32 data points (checkpoints at global steps 2 to 8)."""
    root = tmp_path_factory.mktemp("resume-setup")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"setup": {"name": "helpers.engine_toys:make_setup", "n": 32}, **RECIPE}))
    assert main(["train", "--config", str(config), "--out", str(root / "run"), "--no-progress",
                 "--trust-setup-code"]) == 0
    return root / "run"


def test_checkpoints_record_the_setup(finished):
    meta = json.loads((finished / "checkpoints/step-00000002/meta.json").read_text())
    assert meta["setup"] == {"section": {"name": "helpers.engine_toys:make_setup", "n": 32}, "dataset": "mixture",
                             "section_defaults": {"n": 64, "conditional": True, "from_scratch_seed": None,
                                                  "pretrained": True}}


def test_a_key_given_its_default_is_no_change_of_setup(finished, tmp_path, capsys):
    """A config that now spells out a setup key at its builder's default (a new key a version adds, say) resumes
    the run it trained: the sections mean the same."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "stage-2-2w")  # back to a mid-run state: resume from the step-4 checkpoint
    for name in ("student.json", "student.safetensors", "summary.json"):
        (out / name).unlink(missing_ok=True)
    (out / "checkpoints" / "latest").write_text("step-00000004")
    for later in ("step-00000006", "step-00000008"):
        shutil.rmtree(out / "checkpoints" / later, ignore_errors=True)
    config = _config(tmp_path, {"name": "helpers.engine_toys:make_setup", "n": 32, "pretrained": True,
                                "conditional": True})
    code, _, err = _train(capsys, config, out, "--resume")
    assert code == 0, err
    assert not any("changed setup" in line for line in err)


@pytest.mark.parametrize("setup, key", [
    ({"name": "helpers.engine_toys:make_setup", "n": 48}, "setup.n"),  # other data
    ({"name": "helpers.engine_toys:make_setup"}, "setup.n"),  # a key left out
    ({"name": "helpers.engine_toys:make_setup", "n": 32, "pretrained": False}, "setup.pretrained"),  # another teacher
    ({"name": "test_resume_setup:relabelled_setup", "n": 32}, "setup.name"),  # another family
])
def test_resume_with_another_setup_is_refused_unless_allowed(finished, tmp_path, capsys, setup, key):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    config = _config(tmp_path, setup)
    code, _, err = _train(capsys, config, out, "--resume-from", "4")
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(f"proreflow train: error: {key}: the checkpoint step-00000004 was trained with ")
    assert "--allow-recipe-change" in err[0]
    code, lines, err = _train(capsys, config, out, "--resume-from", "4", "--allow-recipe-change")
    assert code == 0, err
    assert any(f"WARNING resuming with a changed setup: {key}" in line for line in lines), lines
    assert "resuming from" in (out / "train.log").read_text()
    assert json.loads((out / "checkpoints/step-00000006/meta.json").read_text())["setup"]["section"] == setup


def test_another_teacher_or_data_of_the_same_section_is_refused(tmp_path):
    """Through the API (no setup section): the setup's fingerprints (its info's data, teacher) are compared."""
    setup = make_setup(32)
    other = make_setup(32)
    other.info = {"dataset": "another-mixture"}
    train(RECIPE, setup, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match=r"^setup info dataset: the checkpoint step-00000004 was trained with "
                                         r"'mixture', the setup now gives 'another-mixture'"):
        train(RECIPE, other, tmp_path / "run", resume="4", progress=False)
    assert setup_identity(None, {"data": "digits", "teacher_path": "/cache/teachers/digits-1a2b"}) == \
        {"data": "digits", "teacher": "digits-1a2b"}  # a built-in teacher: its cache entry, not the cache folder


def test_a_run_written_before_the_setup_was_recorded_resumes(finished, tmp_path, capsys):
    """Checkpoints without a recorded setup (nor checksums): the setup is unknown and any is accepted."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for path in out.rglob("checksums.json"):
        path.unlink()
    for path in (out / "checkpoints").glob("step-*/meta.json"):
        meta = json.loads(path.read_text())
        del meta["setup"]
        path.write_text(json.dumps(meta))
    code, _, err = _train(capsys, _config(tmp_path, {"name": "helpers.engine_toys:make_setup", "n": 48}), out,
                          "--resume-from", "4")
    assert code == 0 and not err, err
    assert "changed setup" not in (out / "train.log").read_text()


def test_a_finished_run_resumed_says_it_is_finished(finished, tmp_path, capsys, monkeypatch):
    import proreflow.commands.named_setups as named

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = load_file(str(out / "student.safetensors"))
    log = (out / "train.log").read_text()
    monkeypatch.setattr(named, "build_setup", lambda *a, **k: pytest.fail("the setup was built"))
    code, lines, err = _train(capsys, _config(tmp_path, {"name": "helpers.engine_toys:make_setup", "n": 32}), out,
                              "--resume")
    assert code == 0 and not err, err
    assert len(lines) == 1 and lines[0].startswith(f"run in {out} is finished: student at {out}/student.safetensors")
    assert (out / "train.log").read_text() == log  # nothing trained, nothing logged
    after = load_file(str(out / "student.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_finished_run_resumed_through_the_api_logs_it(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    result = train(RECIPE, make_setup(32), out, resume=True, progress=False)
    log = (out / "train.log").read_text()
    assert f"run in {out} is finished: student at {out}/student.safetensors" in log
    assert "stage 3" not in log and len(result.stages) == 2
