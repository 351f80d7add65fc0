"""Streamed training data (webdataset shards, iterables): the documented order, the same global batches
for any process / accumulation / worker layout, exact resume by sample count, damaged data counted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.engine_toys import Mixture, make_setup, tiny_recipe
from safetensors.torch import load_file, save_file

from proreflow.cli import main
from proreflow.training import StageRunner, train
from proreflow.training.batches import BatchPlan
from proreflow.training.progressive import TrainingInterrupted
from proreflow.training.streams import IterableStream, ShardStream, write_shards

WORKER = Path(__file__).with_name("dist_worker.py")
RECIPE = tiny_recipe(checkpoint_every=3, keep_checkpoints=0,
                     defaults={"lr": 1e-2, "batch_size": 8, "grad_accum": 2, "steps": 6, "ema_decay": 0.8,
                               "solver_steps": 2, "cond_dropout": 0.25})


def mixture_items(n: int = 30) -> list[tuple]:
    data = Mixture(n)
    return [data[i] for i in range(n)]


def shards(folder: Path, n: int = 30, per_shard: int = 7) -> ShardStream:
    write_shards(mixture_items(n), folder / "train-%03d.tar", max_count=per_shard)
    return ShardStream(folder)


def key(item) -> tuple:
    """An item as plain numbers (its x0 and label)."""
    return tuple(item[0].tolist()), int(item[1])


def global_stream(stream, seed: int, stage: int, batch: int, steps: int, processes: int, accum: int,
                  workers: int = 0, start_step: int = 0) -> list[tuple]:
    """Every process's micro-batches of ``steps`` steps, put back in stream-position order."""
    by_position = {}
    for rank in range(processes):
        plan = BatchPlan(len(stream), seed, stage, batch, accum, processes, rank)
        batches = stream.micro_batches(plan, start_step, workers)
        for step in range(start_step, start_step + steps):
            for micro in range(accum):
                x0, cond, _ = next(batches)
                for p, x, c in zip(plan.positions(step, micro), x0, cond, strict=True):
                    by_position[p] = (tuple(x.tolist()), int(c))
    return [by_position[p] for p in sorted(by_position)]


def test_write_shards_round_trips_items_bit_for_bit(tmp_path):
    items = mixture_items(30)
    stream = shards(tmp_path)
    assert [p.name for p in stream.shards] == [f"train-{k:03d}.tar" for k in range(5)]
    assert stream.counts == [7, 7, 7, 7, 2] and len(stream) == 30 and stream.left_out == {}
    got = list(stream)  # the given order: shards as listed, samples in file order
    assert [key(i) for i in got] == [key(i) for i in items]
    assert all(a[0].dtype == torch.float64 and torch.equal(a[0], b[0]) for a, b in zip(got, items, strict=True))
    assert key(stream[19]) == key(items[19])


def test_epoch_order_is_the_seeded_shard_order_and_each_epoch_holds_every_item_once(tmp_path):
    """Position p of epoch e is sample p - start of its shard, shards in ``shard_order(seed, stage, e)``;
    a map-style dataset of the same items has another order by design (a permutation of items), but
    every epoch of either holds each item exactly once."""
    items, stream = mixture_items(30), shards(tmp_path)
    by_shard = [items[k:k + 7] for k in range(0, 30, 7)]
    item = stream.reader(5, 1)
    for epoch in range(3):
        order = stream.shard_order(5, 1, epoch)
        expected = [key(i) for s in order for i in by_shard[s]]
        assert [key(item(epoch * 30 + o)) for o in range(30)] == expected
        assert sorted(expected) == sorted(key(i) for i in items)
    orders = [stream.shard_order(5, 1, e) for e in range(3)]
    assert orders[0] != orders[1] and sorted(orders[0]) == list(range(5))
    assert stream.shard_order(5, 2, 0) != orders[0] or stream.shard_order(5, 2, 1) != orders[1]  # stage seeds it
    # the map-style reading of the same items: another order, the same multiset per epoch
    plan = BatchPlan(30, 5, 1, 10, 1)
    mapped = [key(items[i]) for i in plan.indices(range(30))]
    assert sorted(mapped) == sorted(expected) and mapped != expected


@pytest.mark.parametrize("processes, accum, workers", [(2, 1, 0), (1, 2, 0), (2, 2, 0), (1, 2, 2)])
def test_global_batches_are_the_same_for_any_layout(tmp_path, processes, accum, workers):
    """8-sample global batches over 30 items (epochs end inside batches): processes, accumulation
    steps and DataLoader workers change who reads a sample, never which samples a step holds."""
    stream = shards(tmp_path)
    one = global_stream(stream, 0, 0, 8, 9, 1, 1)
    assert one == [key(stream.reader(0, 0)(p)) for p in range(72)]
    assert global_stream(stream, 0, 0, 8, 9, processes, accum, workers) == one


def test_shards_in_given_order_equal_an_iterable_of_the_same_items(tmp_path):
    """ShardStream(shuffle_shards=False) and IterableStream over the same list: the same stream."""
    items = mixture_items(30)
    write_shards(items, tmp_path / "s-%03d.tar", max_count=7)
    ordered, iterable = ShardStream(tmp_path, shuffle_shards=False), IterableStream(items)
    assert len(iterable) == 30
    for processes, accum in [(1, 1), (2, 2)]:
        a = global_stream(ordered, 3, 0, 8, 10, processes, accum)
        assert a == global_stream(iterable, 3, 0, 8, 10, processes, accum)
        assert a == [key(items[p % 30]) for p in range(80)]
    # a resumed reader starts at the same place: step 4 is positions 32.. (epoch 1, offset 2)
    assert global_stream(iterable, 3, 0, 8, 3, 2, 2, start_step=4) == [key(items[p % 30]) for p in range(32, 56)]


def test_a_datasets_stream_reshuffles_each_epoch_and_matches_its_own_replay():
    """A streaming ``datasets.IterableDataset`` with a buffer shuffle: epoch e is its pass after
    set_epoch(e) (each epoch a permutation of the items, another per epoch), and the same for any layout."""
    import datasets

    items = mixture_items(30)
    table = datasets.Dataset.from_dict({"x0": [i[0].tolist() for i in items], "label": [int(i[1]) for i in items]})

    def stream():
        shuffled = table.to_iterable_dataset(num_shards=3).shuffle(seed=4, buffer_size=8)
        return IterableStream(shuffled, to_item=lambda row: (torch.tensor(row["x0"], dtype=torch.float64),
                                                             torch.tensor(row["label"])))

    got = global_stream(stream(), 0, 0, 10, 6, 1, 1)  # two epochs
    assert sorted(got[:30]) == sorted(got[30:]) == sorted(key(i) for i in items)
    assert got[:30] != got[30:] and got[:30] != [key(i) for i in items]
    assert global_stream(stream(), 0, 0, 10, 6, 2, 1) == got


def test_a_resumed_stream_reads_only_its_own_samples_from_the_resume_position(tmp_path, monkeypatch):
    """Resume at step s starts at position s B with nothing before it decoded; each process decodes
    only its own samples (a process of 2 decodes half a step's)."""
    from proreflow.training import streams

    stream, decoded = shards(tmp_path), []
    original = streams._ShardReader._decode

    def counting(self, row):
        decoded.append((self.shard, row))
        return original(self, row)

    monkeypatch.setattr(streams._ShardReader, "_decode", counting)
    plan = BatchPlan(len(stream), 0, 0, 8, 2, 2, 1)
    batches = stream.micro_batches(plan, start_step=5)
    x0, cond, _ = next(batches)
    assert len(decoded) == 2  # b = 8 / (2 x 2) samples, the first of them at position 5 x 8 + 2
    full = stream.reader(0, 0)
    assert [key(full(p)) for p in plan.positions(5, 0)] == [(tuple(x.tolist()), int(c)) for x, c in zip(x0, cond)]


def _same_weights(a: Path, b: Path) -> None:
    for name in ("student.safetensors", "stage-1-4w/ema.safetensors", "stage-2-2w/ema.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


class CtrlCShards(ShardStream):
    """A ShardStream that sends this process SIGINT (Ctrl-C) at its ``at``-th item read (0: never)."""

    at, reads = 0, 0

    def reader(self, seed, stage):
        item = super().reader(seed, stage)

        def read(p):
            self.reads += 1
            if self.reads == self.at:
                os.kill(os.getpid(), signal.SIGINT)
            return item(p)

        return read


def test_interrupted_and_resumed_on_shards_equals_uninterrupted(tmp_path):
    """Ctrl-C in stage 2 and --resume: the weights and the sample counts of an uninterrupted run;
    and a resume from an earlier checkpoint (deleting the later ones) too."""
    write_shards(mixture_items(30), tmp_path / "data" / "s-%03d.tar", max_count=7)

    def setup(at: int = 0):
        made = make_setup()
        made.dataset = CtrlCShards(tmp_path / "data")
        made.dataset.at = at
        return made

    straight = train(RECIPE, setup(), tmp_path / "straight", progress=False)
    with pytest.raises(TrainingInterrupted, match="interrupted at stage 2, step 3"):
        train(RECIPE, setup(6 * 8 + 2 * 8 + 3), tmp_path / "run", progress=False)
    resumed = train(RECIPE, setup(), tmp_path / "run", resume=True, progress=False)
    _same_weights(tmp_path / "run", tmp_path / "straight")
    assert resumed.history == straight.history
    assert [s.samples for s in resumed.stages] == [s.samples for s in straight.stages] == [48, 48]
    again = train(RECIPE, setup(), tmp_path / "run", resume="step-00000003", progress=False)
    _same_weights(tmp_path / "run", tmp_path / "straight")
    assert again.history == straight.history


def test_damaged_shards_and_samples_are_counted_as_skipped_not_fatal(tmp_path):
    """A truncated shard keeps its complete samples, a non-tar file and a shard of
    samples without a condition are left out; all are named by every epoch's first item. An
    undecodable sample is replaced by the next one of its shard, and named."""
    items = mixture_items(21)
    write_shards(items, tmp_path / "s-%03d.tar", max_count=7)
    data = (tmp_path / "s-001.tar").read_bytes()
    (tmp_path / "s-001.tar").write_bytes(data[:len(data) // 2 + 700])  # ends inside sample 3 or 4
    (tmp_path / "s-003.tar").write_bytes(b"not a tar file" * 100)
    write_shards([(torch.zeros(2, dtype=torch.float64), None)], tmp_path / "u-%03d.tar")
    stream = ShardStream(tmp_path)
    assert [p.name for p in stream.shards] == ["s-000.tar", "s-001.tar", "s-002.tar"]
    kept = stream.counts[1]
    assert 1 <= kept < 7 and stream.counts[0] == stream.counts[2] == 7
    assert set(stream.left_out) == {str(tmp_path / n) for n in ("s-001.tar", "s-003.tar", "u-000.tar")}
    assert f"{kept} complete samples before the damage kept" in stream.left_out[str(tmp_path / "s-001.tar")]
    assert "1 samples without x0 and cond left out" in stream.left_out[str(tmp_path / "u-000.tar")]
    assert [key(i) for i in stream][7:7 + kept] == [key(i) for i in items[7:7 + kept]]
    item = stream.reader(0, 0)
    for epoch in range(2):
        first = item(epoch * len(stream))
        assert len(first) == 3 and sorted(first[2]) == sorted(f"{p}: {why}" for p, why in stream.left_out.items())
        assert all(len(item(epoch * len(stream) + o)) == 2 for o in range(1, len(stream)))

    # sample 2 of shard 0 undecodable: its position gives sample 3, naming sample 2
    import tarfile

    with tarfile.open(tmp_path / "s-000.tar") as tar:
        member = [m for m in tar.getmembers() if m.name == "000000002.x0.pth"][0]
    raw = bytearray((tmp_path / "s-000.tar").read_bytes())
    raw[member.offset_data:member.offset_data + member.size] = b"\0" * member.size
    (tmp_path / "s-000.tar").write_bytes(bytes(raw))
    stream = ShardStream(tmp_path, shuffle_shards=False)
    x0, cond, names = stream[2]
    assert key((x0, cond)) == key(items[3]) and len(names) == 1
    assert names[0].startswith(f"{tmp_path / 's-000.tar'}:000000002 (")


def test_a_training_run_counts_the_damaged_shards_of_every_epoch(tmp_path):
    write_shards(mixture_items(21), tmp_path / "s-%03d.tar", max_count=7)
    (tmp_path / "s-003.tar").write_bytes(b"not a tar file" * 100)
    setup = make_setup()
    setup.dataset = ShardStream(tmp_path)
    result = train({**RECIPE, "validation_every": 3, "validation_samples": 4}, setup, tmp_path / "run",
                   progress=False)
    # 48 samples of a 21-item stream per stage: positions 0, 21 and 42 start epochs
    assert [s.skipped_items for s in result.stages] == [3, 3]
    # validation grids condition on the stream's first items (its given order)
    assert len(list((tmp_path / "run" / "validation").rglob("step-*"))) >= 2
    assert result.stages[0].skipped_item_names == [f"{tmp_path / 's-003.tar'}: {stream_why(setup.dataset)}"]


def stream_why(stream: ShardStream) -> str:
    return next(iter(stream.left_out.values()))


def test_max_train_samples_takes_the_first_items_of_the_given_order(tmp_path):
    items, stream = mixture_items(30), shards(tmp_path)
    short = stream.limited(10)
    assert short.counts == [7, 3] and len(short) == 10 and len(stream) == 30
    assert sorted(global_stream(short, 0, 0, 10, 2, 1, 1)[:10]) == sorted(key(i) for i in items[:10])
    assert len(IterableStream(items).limited(10)) == 10
    assert global_stream(IterableStream(items).limited(10), 0, 0, 5, 4, 1, 1) == [key(i) for i in items[:10]] * 2
    setup = make_setup()
    setup.dataset = stream
    with StageRunner(tiny_recipe(max_train_samples=10), setup) as runner:
        assert len(runner.setup.dataset) == 10 and runner.setup.dataset.counts == [7, 3]


def test_bad_stream_input_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no \.tar shards found at \[\]"):
        ShardStream([])
    with pytest.raises(FileNotFoundError, match=r"webdataset shard .*nothing-0\.tar does not exist"):
        ShardStream(str(tmp_path / "nothing-{0..3}.tar"))
    with pytest.raises(FileNotFoundError, match="no .tar shards found"):
        ShardStream(tmp_path)
    (tmp_path / "bad.tar").write_bytes(b"garbage" * 200)
    with pytest.raises(ValueError, match=r"no samples with the field\(s\) x0, cond in 1 shard\(s\) .* \(1 damaged\)"):
        ShardStream(tmp_path)
    with pytest.raises(ValueError, match="needs a re-iterable source"):
        IterableStream(iter(mixture_items(3)))
    with pytest.raises(ValueError, match="gave no items"):
        IterableStream([])
    stream = IterableStream(mixture_items(5), num_items=6)
    with pytest.raises(ValueError, match="pass 0 over the iterable training data ended after 5 items"):
        global_stream(stream, 0, 0, 6, 1, 1, 1)
    with pytest.raises(ValueError, match="num_workers: 2: an IterableStream is read in the training process"):
        stream.micro_batches(BatchPlan(6, 0, 0, 2, 1), 0, num_workers=2)

    class Plain(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(mixture_items(4))

    setup = make_setup()
    setup.dataset = Plain()
    with pytest.raises(ValueError, match=r"^the training dataset \(Plain\) must be map-style .*IterableStream"):
        train(RECIPE, setup, tmp_path / "run", progress=False)


def shard_setup(shards: str):
    """A setup builder by import path with a ``shards`` key (docs/streaming.md)."""
    setup = make_setup()
    setup.dataset = ShardStream(shards)
    return setup


def test_the_cli_names_a_shard_pattern_that_matches_nothing(tmp_path, capsys):
    import yaml

    config = tmp_path / "c.yaml"
    spec = {"name": "test_streams:shard_setup", "shards": "/nonexistent/train-{000..009}.tar"}
    config.write_text(yaml.safe_dump({"setup": spec, **RECIPE}))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "webdataset shard /nonexistent/train-000.tar does not exist" in err[0]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_on_shards_with_loader_workers_match_one(tmp_path):
    """torchrun, 2 CPU processes (gloo) with 2 DataLoader workers each, on shards with a damaged one:
    the weights, teacher evaluations, sample and skipped-item counts of 1 process without workers."""
    write_shards(mixture_items(30), tmp_path / "data" / "s-%03d.tar", max_count=7)
    (tmp_path / "data" / "s-009.tar").write_bytes(b"not a tar file" * 100)
    recipe = {**RECIPE, "num_workers": 2}
    setup = make_setup()
    save_file(setup.teacher_model.state_dict(), str(tmp_path / "teacher.safetensors"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(tmp_path / "two"), json.dumps(recipe), str(tmp_path / "teacher.safetensors"),
           f"shards={tmp_path / 'data'}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    setup.dataset = ShardStream(tmp_path / "data")
    one = train({**RECIPE, "num_workers": 0}, setup, tmp_path / "one", progress=False)
    for name in ("student.safetensors", "stage-1-4w/ema.safetensors", "stage-2-2w/ema.safetensors"):
        a, b = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        assert a.keys() == b.keys()
        for k in a:  # gradients all-reduced over 2 processes: float64 rounding only
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-9)
    summary = json.loads((tmp_path / "two/summary.json").read_text())
    assert [s["teacher_evals"] for s in summary] == [s.teacher_evals for s in one.stages]
    assert [s["samples"] for s in summary] == [s.samples for s in one.stages] == [48, 48]
    assert [s["skipped_items"] for s in summary] == [s.skipped_items for s in one.stages] == [2, 2]
    assert [s["skipped_item_names"] for s in summary] == [s.skipped_item_names for s in one.stages]


def test_other_member_layouts_decode_with_webdataset_handlers(tmp_path):
    """LAION-style latent shards written by another tool (``KEY.latents.npy`` + ``KEY.cls``) read with
    ``x0_field`` / ``cond_field``; unconditional shards with ``cond_field=None``."""
    import numpy as np
    import webdataset as wds

    latents = np.arange(3 * 4, dtype=np.float32).reshape(3, 2, 2)
    with wds.TarWriter(str(tmp_path / "latents-0.tar")) as sink:
        for k in range(3):
            sink.write({"__key__": f"img{k}", "latents.npy": latents[k], "cls": k + 5})
    stream = ShardStream(tmp_path / "latents-0.tar", x0_field="latents", cond_field="cls")
    x0, cond, _ = stream.micro_batches(BatchPlan(3, 0, 0, 3, 1), 0).__next__()
    order = [int(c) - 5 for c in cond]
    assert sorted(order) == [0, 1, 2] and torch.equal(x0, torch.from_numpy(latents[order]))
    with pytest.raises(ValueError, match=r"no samples with the field\(s\) latents, cond .* name the fields"):
        ShardStream(tmp_path / "latents-0.tar", x0_field="latents")

    write_shards([(torch.full((2,), float(k)), None) for k in range(4)], tmp_path / "u" / "u-%03d.tar")
    unconditional = ShardStream(tmp_path / "u", cond_field=None)
    assert [(float(x[0]), c) for x, c in unconditional] == [(0.0, None), (1.0, None), (2.0, None), (3.0, None)]


def test_dict_conditions_round_trip(tmp_path):
    """Text-to-image latents: a condition dict (SD's encoder states, SDXL's added_cond_kwargs) per sample."""
    g = torch.Generator().manual_seed(0)
    items = [(torch.randn(4, 2, 2, generator=g), {"encoder_hidden_states": torch.randn(3, 8, generator=g),
                                                   "added_cond_kwargs": {"time_ids": torch.arange(6.0) + k}})
             for k in range(5)]
    write_shards(items, tmp_path / "t-%03d.tar")
    x0, cond, _ = ShardStream(tmp_path, shuffle_shards=False).micro_batches(BatchPlan(5, 0, 0, 5, 1), 0).__next__()
    assert torch.equal(x0, torch.stack([i[0] for i in items]))
    assert torch.equal(cond["encoder_hidden_states"], torch.stack([i[1]["encoder_hidden_states"] for i in items]))
    assert torch.equal(cond["added_cond_kwargs"]["time_ids"], torch.stack([torch.arange(6.0) + k for k in range(5)]))


def test_a_shard_index_skips_the_listing_of_unchanged_shards(tmp_path, monkeypatch):
    """``index=``: the first open lists every shard and writes the layouts; the next lists none, and
    one whose file changed (size or modification time) alone; both read the same stream."""
    from proreflow.training import streams

    write_shards(mixture_items(30), tmp_path / "data" / "s-%03d.tar", max_count=7)
    (tmp_path / "data" / "s-009.tar").write_bytes(b"not a tar file" * 100)
    listed = []
    original = streams.list_samples
    monkeypatch.setattr(streams, "list_samples",
                        lambda path, fields: listed.append(path.name) or original(path, fields))
    index = tmp_path / "index" / "layout.npz"
    first = ShardStream(tmp_path / "data", index=index)
    assert len(listed) == 6 and index.is_file()
    listed.clear()
    again = ShardStream(tmp_path / "data", index=index)
    assert listed == [] and again.counts == first.counts and again.left_out == first.left_out
    assert global_stream(again, 1, 0, 8, 8, 2, 1) == global_stream(first, 1, 0, 8, 8, 1, 1)
    os.utime(tmp_path / "data" / "s-002.tar", ns=(1, 1))
    ShardStream(tmp_path / "data", index=index)
    assert listed == ["s-002.tar"]
    listed.clear()
    ShardStream(tmp_path / "data", index=index, cond_field=None)  # other fields: another layout
    assert len(listed) == 6
