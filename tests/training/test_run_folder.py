"""One writer per run folder: a second ``proreflow train`` into a folder another run is writing in is
refused (one line naming the folder and the other pid, exit 2), a lock left by a dead process is not;
temporary names hold the writer's pid, and the temporaries a killed run left are removed at the next
start, with a log line."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.engine_toys import Mixture, make_setup, tiny_recipe

from proreflow import files
from proreflow.files import TEMPORARY, FolderInUse, folder_lock, temporary_path
from proreflow.training import checkpoint, train

RECIPE = tiny_recipe(checkpoint_every=3, keep_checkpoints=2,
                     defaults={"lr": 1e-2, "batch_size": 8, "steps": 60, "ema_decay": 0.9, "solver_steps": 2})
HERE = Path(__file__).parent


def _command(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "proreflow.cli", "train", "--config", str(config), "--out", str(out),
            "--no-progress", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}


class Slow(Mixture):
    """A Mixture that takes 0.1 s per item read (a run that is still writing when the second one starts)."""

    def __getitem__(self, i):
        time.sleep(0.1)
        return super().__getitem__(i)


def slow_setup():
    setup = make_setup()
    setup.dataset = Slow()
    return setup


def _config(path: Path, name: str) -> Path:
    path.write_text(yaml.safe_dump({"setup": {"name": name}, **RECIPE}))
    return path


def test_a_second_run_in_the_same_folder_is_refused_and_a_dead_ones_lock_is_not(tmp_path):
    config = _config(tmp_path / "c.yaml", "helpers.engine_toys:make_setup")
    out, env = tmp_path / "run", _env()
    first = subprocess.Popen(_command(_config(tmp_path / "slow.yaml", "test_run_folder:slow_setup"), out), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (out / "checkpoints" / "latest").exists():  # the first run is writing
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.05)
        second = subprocess.run(_command(config, out, "--resume"), env=env, capture_output=True, timeout=300)
    finally:
        first.send_signal(signal.SIGKILL)  # no cleanup: its lock file, maybe temporaries, stay
        first.wait()
    err = second.stderr.decode().strip().splitlines()
    assert second.returncode == 2, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(f"proreflow train: error: --out: {out} is in use by another run (pid {first.pid} on ")
    assert (out / ".lock").read_text().split()[0] == str(first.pid)  # what a dead process left
    (out / "checkpoints" / ".step-00000099.tmp-12345").mkdir()  # what a crash mid-write leaves
    (out / "checkpoints" / ".step-00000099.tmp-12345" / "state.pt").write_bytes(b"half")
    (out / ".student.safetensors.tmp-12345").write_bytes(b"half")
    # the same data and teacher, unslowed: another setup section, so the change is allowed explicitly
    third = subprocess.run(_command(config, out, "--resume", "--allow-recipe-change"), env=env, capture_output=True,
                           timeout=600)
    assert third.returncode == 0, third.stderr.decode()
    assert (out / "student.safetensors").is_file()
    assert not [p for p in out.rglob("*") if TEMPORARY.fullmatch(p.name)]
    log = (out / "train.log").read_text()
    assert re.search(r"removed \d+ temporary file\(s\) an interrupted run left in .*\.student\.safetensors\.tmp-12345",
                     log) and "checkpoints/.step-00000099.tmp-12345" in log


def test_the_lock_refuses_another_process_and_is_reentrant_in_one(tmp_path):
    with folder_lock(tmp_path), folder_lock(tmp_path):  # the command line, then train()
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
        probe = ("import sys; from proreflow.files import folder_lock\n"
                 "try:\n    folder_lock(sys.argv[1]).__enter__()\n"
                 "except ValueError as err:\n    print(err); sys.exit(2)")
        other = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True)
        assert other.returncode == 2 and f"in use by another run (pid {os.getpid()} on " in other.stdout
    assert not files._HELD and (tmp_path / ".lock").read_text() == ""
    other = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True)
    assert other.returncode == 0, other.stdout  # released


def test_the_lock_error_names_the_folder_and_pid(tmp_path, monkeypatch):
    (tmp_path / ".lock").write_text("4242 elsewhere\n")

    def busy(fd, how):
        raise BlockingIOError

    monkeypatch.setattr(files.fcntl, "flock", busy)
    with pytest.raises(FolderInUse, match=rf"^--out: {tmp_path} is in use by another run \(pid 4242 on elsewhere"):
        with folder_lock(tmp_path):
            pass


def test_temporary_names_hold_the_writers_pid(tmp_path, monkeypatch):
    assert temporary_path(tmp_path / "a.json") == tmp_path / f".a.json.tmp-{os.getpid()}"
    assert TEMPORARY.fullmatch(temporary_path(tmp_path / "a.json").name)
    assert TEMPORARY.fullmatch(".step-00000003.tmp") and TEMPORARY.fullmatch(".stage-1-4w.old-17")
    assert not TEMPORARY.fullmatch("step-00000003") and not TEMPORARY.fullmatch(".lock")
    moved, replace_dir = [], checkpoint.replace_dir

    def recording(tmp, final):
        moved.append(tmp.name)
        replace_dir(tmp, final)

    monkeypatch.setattr(checkpoint, "replace_dir", recording)
    train(tiny_recipe(checkpoint_every=4), make_setup(), tmp_path / "run", progress=False)
    assert moved and all(re.fullmatch(rf"\.(step-\d{{8}}|stage-\d-\dw)\.tmp-{os.getpid()}", name) for name in moved)
    assert {name.split(".")[1][:5] for name in moved} == {"step-", "stage"}


def test_every_run_logs_its_world_size_at_the_start(tmp_path):
    train(tiny_recipe(), make_setup(), tmp_path, progress=False)
    train(tiny_recipe(), make_setup(), tmp_path, resume=True, progress=False)
    starts = [line for line in (tmp_path / "train.log").read_text().splitlines()
              if "world size" in line and not line.startswith("#")]
    assert len(starts) == 2 and all(f"run tiny in {tmp_path}: world size 1 (processes), device cpu" in line
                                    for line in starts)


def test_train_log_opens_with_the_command_versions_setup_and_recipe_and_ends_with_the_result(tmp_path):
    import json

    import torch

    result = train(tiny_recipe(), make_setup(), tmp_path, progress=False)
    lines = (tmp_path / "train.log").read_text().splitlines()
    header = [line[2:] for line in lines if line.startswith("# ")]
    assert header[0] == "command: " + shlex.join(sys.argv)
    assert f"torch {torch.__version__}" in header[1] and header[1].startswith("versions: python ")
    assert header[2] == "world size 1 (processes), device cpu"
    assert header[3].startswith("setup: ")
    recipe_lines = header[header.index("resolved recipe:") + 1:]
    assert recipe_lines == (tmp_path / "recipe.yaml").read_text().splitlines()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert lines[-1].endswith(
        f"result: {len(summary)} stage(s), {sum(s['steps'] for s in summary)} optimiser steps, "
        f"{sum(s['teacher_evals'] for s in summary)} teacher evaluations, "
        f"{sum(s['seconds'] for s in summary):.1f} s of training; student ({result.windows.count} windows) at "
        f"{tmp_path / 'student.safetensors'}")


@pytest.mark.parametrize("resume", [False, True])
def test_an_output_folder_holding_other_files_is_refused(tmp_path, capsys, resume):
    """A run writes checkpoints/, stage-*/, student.* ... into --out: a folder of something else is one line
    (exit 2) naming what is there, with or without --resume, and is left as it was."""
    from proreflow.cli import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    config = _config(tmp_path / "c.yaml", "helpers.engine_toys:make_setup")
    args = ["train", "--config", str(config), "--out", str(out), "--no-progress", *(["--resume"] * resume)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"proreflow train: error: --out {out} holds files that are not a run's (notes.txt): choose a new "
                   "or empty folder"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_checkpoint_that_fails_to_write_leaves_no_temporary(tmp_path, monkeypatch):
    """A full disk while a checkpoint is written: the error comes through as an OSError (exit code 1 from the
    command line), the half-written folder is removed at once, and the checkpoint before it stays the newest."""
    import errno

    real, calls = checkpoint.save_torch, []

    def save_torch(obj, path):
        calls.append(path.name)
        if path.name == "state.pt" and calls.count("state.pt") == 2:  # the second checkpoint's
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(checkpoint, "save_torch", save_torch)
    with pytest.raises(OSError, match="No space left"):
        train(tiny_recipe(checkpoint_every=2), make_setup(), tmp_path / "run", progress=False)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]
