"""What reading a stream costs: opening shards, the first micro-batch of a fresh run and of a resumed one.

Writes ``--shards`` webdataset shards of ``--per-shard`` samples (``x0``: a float32 tensor of
``--shape``, ``cond``: an integer label) to a temporary folder, then times, for one process of
``--processes`` with ``--batch`` samples per step:

- ``ShardStream(folder)``: listing every shard's tar headers (the sample count); with ``index=``
  the first time (listing, then writing the index) and the next (reading it);
- the first micro-batch at step 0 and at the step that starts 90% into the first epoch (a resume):
  a ShardStream jumps there from the counts; an IterableStream over the same shards read in order
  (an iterable without random access) reads and drops every item before it;
- the samples each decodes on the way.

Usage::

    python benchmarks/stream_reading.py [--shards 100] [--per-shard 100] [--shape 4 32 32] [--processes 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from proreflow.training import streams
from proreflow.training.batches import BatchPlan
from proreflow.training.streams import IterableStream, ShardStream, write_shards


def first_batch(stream, plan: BatchPlan, step: int) -> float:
    start = time.perf_counter()
    next(stream.micro_batches(plan, step))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 32, 32])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    n = args.shards * args.per_shard
    g = torch.Generator().manual_seed(0)
    items = [(torch.randn(args.shape, generator=g), torch.tensor(k % 10)) for k in range(n)]
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        write_shards(items, Path(folder) / "s-%05d.tar", max_count=args.per_shard)
        print(f"write_shards: {n} samples in {args.shards} shards, {time.perf_counter() - start:.2f} s")
        start = time.perf_counter()
        shards = ShardStream(folder)
        print(f"ShardStream(folder): listing {args.shards} shards' headers, {time.perf_counter() - start:.2f} s")
        for what in ("listing and writing the index", "reading the index"):
            start = time.perf_counter()
            ShardStream(folder, index=Path(folder) / "index.npz")
            print(f"ShardStream(folder, index=...): {what}, {time.perf_counter() - start:.2f} s")
        iterable = IterableStream(ShardStream(folder, shuffle_shards=False), num_items=n)
        plan = BatchPlan(n, 0, 0, args.batch, 1, args.processes, args.processes - 1)
        resume = int(0.9 * n) // args.batch
        decoded = []
        original = streams._ShardReader._decode
        streams._ShardReader._decode = lambda self, row: decoded.append(row) or original(self, row)
        for name, stream in (("ShardStream", shards), ("IterableStream", iterable)):
            for step in (0, resume):
                decoded.clear()
                seconds = first_batch(stream, plan, step)
                print(f"{name}: first micro-batch at step {step} (position {step * args.batch}), "
                      f"{seconds * 1000:.1f} ms, {len(decoded)} samples decoded")


if __name__ == "__main__":
    main()
