"""The model cache refuses a folder it cannot use before training, and names a damaged entry."""

from __future__ import annotations

import subprocess
import sys

import pytest

from proreflow.builtin.store import load_entry, load_or_fit


def _never(*_):
    raise AssertionError("fit() must not run: the cache folder was refused first")


def test_a_cache_that_cannot_be_written_is_refused_before_fitting(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=f"cache folder {blocker}.* cannot be written.*--cache-dir"):
        load_or_fit("teachers", "x", {"a": 1}, {"class": "MLPDenoiser"}, _never, cache_dir=blocker)


def test_a_damaged_entry_names_its_file(tmp_path):
    import torch

    from proreflow.builtin.networks import mlp_spec

    spec = mlp_spec((2,), width=8, depth=1)
    from proreflow.builtin.networks import build_network

    entry = load_or_fit("teachers", "x", {"a": 1}, spec, lambda: (build_network(spec), {}), cache_dir=tmp_path)
    weights, record = entry.path / "model.safetensors", entry.path / "config.json"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"cached weights {weights} are damaged.*--force"):
        load_entry(entry.path)
    weights.write_bytes(data)
    assert isinstance(load_entry(entry.path)[0], torch.nn.Module)
    record.write_text("{garbage")
    with pytest.raises(ValueError, match=f"cached record {record} is damaged"):
        load_entry(entry.path)


def test_the_cli_says_one_line_for_an_unwritable_cache(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    done = subprocess.run([sys.executable, "-m", "proreflow.cli", "teacher", "--data", "moons", "--cache-dir",
                           str(blocker / "sub"), "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--cache-dir" in lines[0], done.stderr
