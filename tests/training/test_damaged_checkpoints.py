"""Resume falls back past a damaged checkpoint: every kind of damage is reported in one line and the
run resumes from the newest complete checkpoint, ending bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import logging
import shutil
import struct

import pytest
import torch
from helpers.engine_toys import CrashingMixture, make_setup, tiny_recipe
from safetensors.torch import load_file, save_file

from proreflow.training import train
from proreflow.training.checkpoint import CheckpointError, Layout, resume_checkpoint
from proreflow.training.recipes import load_recipe
from proreflow.training.stage_runner import Trainee

RECIPE = tiny_recipe(checkpoint_every=2, keep_checkpoints=0,
                     defaults={"lr": 1e-2, "batch_size": 8, "steps": 6, "ema_decay": 0.8, "solver_steps": 2})
# checkpoints at global steps 2, 4, 6 (end of stage 1), 8, 10; the crash is at stage 2, step 5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train(RECIPE, make_setup(), root / "straight", progress=False)
    setup = make_setup()
    setup.dataset = CrashingMixture(6 * 8 + 4 * 8 + 1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(RECIPE, setup, root / "crashed", progress=False)
    return root


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _overwrite_data(path, fill=b"\x00" * 16):
    """Overwrite bytes in the middle of a safetensors file's data with ``fill`` (zeros: finite values)."""
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    middle = start + (len(data) - start) // 2
    assert data[middle:middle + len(fill)] != fill
    data[middle:middle + len(fill)] = fill
    path.write_bytes(bytes(data))


def _unchecked(damage):
    """``damage``, in a checkpoint written before checksums existed (its checksums.json deleted): what the
    other content checks find."""
    def apply(out):
        (out / LAST / "checksums.json").unlink()
        damage(out)
    return apply


def _rewrite_weights(path, change):
    """Save ``change(tensors)`` of a safetensors file in its place (a well-formed file)."""
    save_file(change(load_file(str(path))), str(path))


def _edit_meta(out, **values):
    meta = json.loads((out / LAST / "meta.json").read_text())
    (out / LAST / "meta.json").write_text(json.dumps({**meta, **values}))


def _reshape_moment(out):
    state = torch.load(out / LAST / "state.pt", weights_only=True)
    moments = state["optimizer"]["state"][0]
    moments["exp_avg"] = moments["exp_avg"].reshape(-1)[:5].clone()
    torch.save(state, out / LAST / "state.pt")


def _point_outside(out):
    other = out.parent / "other-run"
    shutil.copytree(out, other)
    (other / "checkpoints/step-00000012").mkdir()  # a newer-looking folder in another run
    (out / "checkpoints/latest").write_text("../../other-run/checkpoints/step-00000012\n")


LAST = "checkpoints/step-00000010"
DAMAGE = {  # name: (how, checkpoint resumed from, text of the warning)
    "student truncated": (lambda o: _truncate(o / LAST / "student.safetensors"), 8, "student.safetensors is unread"),
    "student empty": (lambda o: (o / LAST / "student.safetensors").write_bytes(b""), 8, "student.safetensors is unr"),
    "student deleted": (lambda o: (o / LAST / "student.safetensors").unlink(), 8, "student.safetensors is missing"),
    "ema truncated": (lambda o: _truncate(o / LAST / "ema.safetensors"), 8, "ema.safetensors is unreadable"),
    "ema empty": (lambda o: (o / LAST / "ema.safetensors").write_bytes(b""), 8, "ema.safetensors is unreadable"),
    "ema deleted": (lambda o: (o / LAST / "ema.safetensors").unlink(), 8, "ema.safetensors is missing"),
    "stage result deleted": (lambda o: (o / "stage-1-4w/ema.safetensors").unlink(), 4,
                             "stage-1-4w/ema.safetensors is missing"),
    "stage result truncated": (lambda o: _truncate(o / "stage-1-4w/ema.safetensors"), 4,
                               "stage-1-4w/ema.safetensors is unreadable"),
    "meta garbage": (lambda o: (o / LAST / "meta.json").write_bytes(b"\x00\xffgarbage{"), 8, "meta.json is not valid"),
    "meta empty mapping": (lambda o: (o / LAST / "meta.json").write_text("{}"), 8, "meta.json: 'format' is missing"),
    "meta a list": (lambda o: (o / LAST / "meta.json").write_text("[1, 2]"), 8, "meta.json holds a list"),
    "meta wrong type": (lambda o: (o / LAST / "meta.json").write_text(
        (o / LAST / "meta.json").read_text().replace('"step": 4', '"step": "4"')), 8, "meta.json: 'step' is not a"),
    "meta deleted": (lambda o: (o / LAST / "meta.json").unlink(), 8, "meta.json is missing"),
    "state truncated": (lambda o: _truncate(o / LAST / "state.pt"), 8, "state.pt is unreadable"),
    "state deleted": (lambda o: (o / LAST / "state.pt").unlink(), 8, "state.pt is missing"),
    "rng garbage": (lambda o: (o / LAST / "rng-0.pt").write_bytes(b"garbage" * 10), 8, "rng-0.pt is unreadable"),
    "rng deleted": (lambda o: (o / LAST / "rng-0.pt").unlink(), 8, "rng-0.pt is missing"),
    # issue 27 item 4: valid-looking files with wrong contents, bit rot, a meta.json beyond its recipe
    "student bytes overwritten (finite)": (lambda o: _overwrite_data(o / LAST / "student.safetensors"), 8,
                                           "student.safetensors does not match its SHA-256"),
    "ema bytes overwritten (finite)": (lambda o: _overwrite_data(o / LAST / "ema.safetensors"), 8,
                                       "ema.safetensors does not match its SHA-256"),
    "state bytes overwritten": (lambda o: _overwrite_data(o / LAST / "state.pt", b"\x01" * 4), 8, "state.pt"),
    "ema copied over the student": (lambda o: shutil.copy(o / LAST / "ema.safetensors",
                                                          o / LAST / "student.safetensors"),
                                    8, "student.safetensors does not match its SHA-256"),
    "stage result copied over the ema": (lambda o: shutil.copy(o / "stage-1-4w/ema.safetensors",
                                                               o / LAST / "ema.safetensors"), 8, "ema.safetensors"),
    "stage result bytes overwritten": (lambda o: _overwrite_data(o / "stage-1-4w/ema.safetensors"), 4,
                                       "stage-1-4w/ema.safetensors does not match its SHA-256"),
    "state of another checkpoint": (lambda o: shutil.copy(o / "checkpoints/step-00000008/state.pt",
                                                          o / LAST / "state.pt"), 8, "state.pt does not match"),
    "checksums garbage": (lambda o: (o / LAST / "checksums.json").write_text("{oops"), 8, "checksums.json is unread"),
    "meta step beyond its stage": (lambda o: _edit_meta(o, step=9), 8, "meta.json: step 9 lies beyond stage 2"),
    "meta stage beyond its recipe": (lambda o: _edit_meta(o, stage=5), 8, "meta.json: stage 5, step 4 is not a place"),
    "meta global step off": (lambda o: _edit_meta(o, global_step=11), 8, "meta.json: global step 11 is not"),
    "meta completed lost": (lambda o: _edit_meta(o, completed=[]), 8, "meta.json: 'completed' does not hold"),
    "unchecked: student of another name": (_unchecked(lambda o: _rewrite_weights(
        o / LAST / "student.safetensors", lambda t: {("x" + k if k == "inp.weight" else k): v for k, v in t.items()})),
        8, "student.safetensors holds other tensors than the student's (missing: inp.weight; unexpected: xinp"),
    "unchecked: student of another shape": (_unchecked(lambda o: _rewrite_weights(
        o / LAST / "student.safetensors", lambda t: {**t, "inp.weight": t["inp.weight"][:4].clone()})),
        8, "student.safetensors holds other tensors than the student's: inp.weight is [4, 3] float64"),
    "unchecked: ema of another dtype": (_unchecked(lambda o: _rewrite_weights(
        o / LAST / "ema.safetensors", lambda t: {k: v.float() for k, v in t.items()})),
        8, "ema.safetensors holds other tensors than the student's: embed.weight is [4, 32] float32"),
    "unchecked: student with a NaN": (_unchecked(lambda o: _rewrite_weights(
        o / LAST / "student.safetensors", lambda t: {**t, "inp.bias": t["inp.bias"] * float("nan")})),
        8, "student.safetensors holds non-finite values: inp.bias has 32 of 32"),
    "unchecked: optimiser moment of another shape": (_unchecked(_reshape_moment), 8,
                                                     "state.pt: the optimiser's exp_avg of parameter 0 has shape [5]"),
    "latest garbage": (lambda o: (o / "checkpoints/latest").write_bytes(b"\xff\xfe??"), 10, "does not name"),
    "latest outside the run": (_point_outside, 10, "does not name a checkpoint folder of this run"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_falls_back_to_the_previous_complete_one(runs, tmp_path, caplog, kind):
    damage, expected_step, message = DAMAGE[kind]
    out = tmp_path / "run"
    shutil.copytree(runs / "crashed", out)
    damage(out)
    found = resume_checkpoint(out, layout=Layout.of(Trainee.network(make_setup(), load_recipe(RECIPE))))
    assert found.path.name == f"step-{expected_step:08d}"
    with caplog.at_level(logging.INFO, logger="proreflow.training"):
        result = train(RECIPE, make_setup(), out, resume=True, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(message in w for w in warnings), warnings
    assert all("\n" not in w for w in warnings)
    assert f"resuming from {out / 'checkpoints' / found.path.name}" in caplog.text
    for name in ("student.safetensors", "stage-1-4w/ema.safetensors", "stage-2-2w/ema.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(runs / "straight" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert len(result.history) == 12


def test_checkpoints_written_before_checksums_still_resume(runs, tmp_path):
    """A run whose folders hold no checksums.json (written before them) resumes from its newest checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(runs / "crashed", out)
    for path in out.rglob("checksums.json"):
        path.unlink()
    assert resume_checkpoint(out).path.name == "step-00000010"
    train(RECIPE, make_setup(), out, resume=True, progress=False)
    a, b = load_file(str(out / "student.safetensors")), load_file(str(runs / "straight" / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_with_every_checkpoint_damaged_the_error_says_so(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs / "crashed", out)
    for meta in (out / "checkpoints").glob("step-*/meta.json"):
        meta.write_text("{}")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint left in .*step-00000010: meta.json: "
                                              r"'format' is missing.*delete .* to start over"):
        train(RECIPE, make_setup(), out, resume=True, progress=False)
