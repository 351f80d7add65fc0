"""Training data read as a stream: webdataset tar shards, or any iterable of ``(x0, cond)`` items.

A stream is a ``DistillationSetup.dataset`` that the engine reads in order instead of by random
access. Its items form one global sequence, the same in every process:

- :class:`ShardStream` (webdataset ``.tar`` shards): epoch ``e`` visits the shards in an order
  seeded by ``(seed, stage, e)`` (or as given, ``shuffle_shards=False``) and the samples of each
  shard in file order. Write the shards shuffled (img2dataset does; :func:`write_shards` keeps
  the order it is given) since nothing mixes samples across shards.
- :class:`IterableStream` (a list, a generator function's iterable, a torch ``IterableDataset``,
  a streaming Hugging Face ``datasets.IterableDataset``): epoch ``e`` is the ``e``-th pass over it
  (``set_epoch(e)`` is called first when it has one, so ``ds.shuffle(seed, buffer_size)`` of a
  ``datasets`` stream reshuffles each epoch, deterministically).

Global stream position ``p`` (epoch ``p // N``, offset ``p % N`` for ``N = len(stream)`` items
per epoch) goes where :class:`~proreflow.training.batches.BatchPlan` puts it: optimiser step
``s`` takes positions ``[s B, (s + 1) B)``, process ``r`` at micro-step ``m`` takes
``s B + m P b + r b + [0, b)``, and a sample's time, noise and dropout draw are seeded by its
position. So a step's global batch is the same whatever the number of processes, and a resume at
step ``s`` starts at position ``s B``: the sample count, with nothing of the run to replay.

What each process reads, and what a resume skips:

- ShardStream: every process lists the shards' tar headers once when the stream is made (512
  bytes per member, the member data is seeked over) and keeps where each sample's members lie
  (:class:`ShardLayout`); then each process, and each DataLoader worker of it (``num_workers``;
  worker ``w`` of ``W`` builds micro-batches ``w, w + W, ...``), seeks to and reads the bytes of
  its own samples only (``index=``: the listing kept in a file, for later runs). A resume
  computes the shard and sample of position ``s B`` from the counts and starts there: nothing
  before it is read or decoded.
- IterableStream: an iterable has no random access, so every process iterates all of it and
  keeps the items at its positions (each process reads the whole stream; only its own items go
  to the collate and the network). It is read in the training process (``num_workers: 0``): a
  worker would read the whole stream again, and ``datasets`` streams split themselves by worker.
  A resume restarts the epoch of position ``s B`` (earlier epochs are not read) and reads and
  drops its first ``s B mod N`` items. ``len`` is ``num_items`` when given, else one counting
  pass over the iterable.

Layout-based splitting (webdataset's ``split_by_node`` / ``split_by_worker``, ``datasets``'
``split_dataset_by_node``) is not used: it gives each process whole shards, so the samples of a
global batch would depend on the number of processes, and 2 processes would not train what 1 does.

Damaged data is counted, not fatal (the engine's skipped items, ``DistillationSetup``): a shard
that cannot be opened, ends early (a member runs past the end of the file; its complete samples
before the damage are kept, less the last one, which may lack members) or holds samples without
the fields is named by the first item of every epoch (:attr:`ShardStream.left_out`); a sample
that fails to decode is replaced by the next readable sample of its shard and named by the item
that replaces it.
"""

from __future__ import annotations

import bisect
import io
import itertools
import json
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from ..conditioning import map_cond
from ..files import atomic_write
from .batches import BatchPlan, micro_batches, mix_seed

Item = tuple  # (x0, cond) or (x0, cond, skipped names)


def expand_shards(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard paths from a brace pattern (``data/{00000..00099}.tar``), a folder of ``.tar`` files, one
    file, or a list of these; a FileNotFoundError naming the pattern when it gives none."""
    from braceexpand import braceexpand  # installed with webdataset

    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    paths = []
    for one in specs:
        for item in braceexpand(str(one)):
            path = Path(item).expanduser()
            if path.is_dir():
                paths.extend(sorted(path.glob("*.tar")))
            elif path.is_file():
                paths.append(path)
            else:
                raise FileNotFoundError(f"webdataset shard {path} does not exist (from {one!r})")
    if not paths:
        raise FileNotFoundError(f"no .tar shards found at {spec!r}: give a brace pattern such as "
                                "data/{00000..00099}.tar, a folder of .tar files or a list of files")
    return paths


def write_shards(items: Iterable[Item], pattern: str | Path, max_count: int = 10_000) -> list[Path]:
    """Write ``(x0, cond)`` items as webdataset shards (webdataset's ``ShardWriter``) that
    :class:`ShardStream` reads: sample ``k`` is ``{k:09d}.x0.pth`` (+ ``{k:09d}.cond.pth`` when its
    condition is not None), ``max_count`` samples per shard, in the order given. ``pattern`` holds a
    printf field for the shard number, e.g. ``shards/train-%05d.tar``; returns the shard paths."""
    import webdataset as wds

    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with wds.ShardWriter(str(pattern), maxcount=max_count, verbose=0, post=lambda name: written.append(Path(name))
                         ) as sink:
        for k, item in enumerate(items):
            sample = {"__key__": f"{k:09d}", "x0.pth": torch.as_tensor(item[0]).clone()}
            if item[1] is not None:  # clone: a view would save its whole storage
                sample["cond.pth"] = map_cond(lambda c: torch.as_tensor(c).clone(), item[1])
            sink.write(sample)
    return written


class Stream(IterableDataset):
    """A dataset the engine reads in stream order (module doc); ``len`` is its items per epoch."""

    def micro_batches(self, plan: BatchPlan, start_step: int, num_workers: int = 0) -> Iterator[tuple]:
        """This process's micro-batches ``(x0, cond, skipped)`` of ``plan`` from ``start_step`` on, forever
        (:func:`~proreflow.training.batches.micro_batches`)."""
        return micro_batches(self, plan, start_step, num_workers)

    def reader(self, seed: int | None, stage: int) -> Callable[[int], Item]:
        """``item(p)``: the item at global position ``p`` of stage ``stage``'s stream, read fastest in increasing
        ``p``; ``seed`` None: the unshuffled order."""
        raise NotImplementedError

    def limited(self, count: int) -> Stream:
        """The stream of the first ``count`` items of each epoch (recipe ``max_train_samples``)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Item]:
        """The items of one epoch, unshuffled (for inspection; training reads :meth:`micro_batches`)."""
        item = self.reader(None, 0)
        return (item(p) for p in range(len(self)))


def _torch_loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


@lru_cache(maxsize=1)
def _decoder():
    """webdataset's decoder (by file extension: npy, cls, json, txt, ...), with ``.pth`` files loaded
    by ``torch.load(weights_only=True)`` (webdataset's own handler unpickles arbitrary objects)."""
    from webdataset.autodecode import Decoder, basichandlers, handle_extension

    return Decoder([handle_extension("pth", _torch_loads), basichandlers])


class ShardStream(Stream):
    """webdataset tar shards as a stream (module doc).

    shards: a brace pattern, a folder of ``.tar`` files, one file, or a list of these.
    x0_field / cond_field: the sample's members (webdataset keys: ``KEY.x0.pth`` is field ``x0``)
        holding ``x0`` and its condition (decoded by extension: ``.pth`` tensors or dicts of them,
        ``.npy``, ``.cls`` integers, ...); ``cond_field=None``: unconditional, cond None.
    shuffle_shards: visit the shards in a seeded order per epoch (else as given).
    index: a ``.npz`` file keeping the shards' layouts (:func:`read_index`): a shard whose path, size
        and modification time are in it is not listed again; it is written when a shard was listed.

    Why not ``webdataset.WebDataset``: its tar iterator reads every member's bytes in order, so every
    process would read all the data; here each process seeks to its own samples. webdataset's key
    rule, decoders and writer are used as they are.
    """

    def __init__(self, shards: str | Path | Sequence[str | Path], x0_field: str = "x0",
                 cond_field: str | None = "cond", shuffle_shards: bool = True, index: str | Path | None = None):
        paths = expand_shards(shards)
        self.x0_field, self.cond_field, self.shuffle_shards = x0_field, cond_field, shuffle_shards
        self.left_out: dict[str, str] = {}
        self._lookup: _ShardReader | None = None
        self.shards: list[Path] = []
        self.layouts: list[ShardLayout] = []
        known = read_index(index, self._fields()) if index is not None else {}
        entries = []
        for path in paths:
            stat = path.stat()
            fingerprint = [str(path), stat.st_size, stat.st_mtime_ns]
            entry = known.get(str(path))
            if entry is None or entry[0] != fingerprint:
                entry = (fingerprint, *list_samples(path, self._fields()))
            entries.append(entry)
            _, layout, damage = entry
            if damage:
                self.left_out[str(path)] = damage
            if layout.count:
                self.shards.append(path)
                self.layouts.append(layout)
        if index is not None and any(entry is not known.get(entry[0][0]) for entry in entries):
            write_index(index, self._fields(), entries)
        if not self.layouts:
            raise ValueError(f"no samples with the field(s) {', '.join(self._fields())} in {len(paths)} shard(s) "
                             f"at {shards!r} ({len(self.left_out)} damaged): write them with "
                             "proreflow.training.streams.write_shards, or name the fields (x0_field, cond_field)")

    @property
    def counts(self) -> list[int]:
        """Samples per shard."""
        return [layout.count for layout in self.layouts]

    def _fields(self) -> tuple[str, ...]:
        return (self.x0_field,) + ((self.cond_field,) if self.cond_field is not None else ())

    def __len__(self) -> int:
        return sum(self.counts)

    def __getitem__(self, i: int) -> Item:
        """Item ``i`` in the shards' given order (for inspection and validation grids; training reads
        in stream order)."""
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} of a stream of {len(self)} items")
        if self._lookup is None:
            self._lookup = _ShardReader(self, None, 0)
        return self._lookup(i)

    def __getstate__(self) -> dict:  # an open shard stays in its process
        return {**self.__dict__, "_lookup": None}

    def limited(self, count: int) -> ShardStream:
        """The first ``count`` samples in the shards' given order (whole shards, then part of one)."""
        cut = bisect.bisect_left(list(itertools.accumulate(self.counts)), count)
        if cut >= len(self.counts):
            return self
        out = object.__new__(ShardStream)
        out.__dict__.update(self.__dict__)
        out.shards, out._lookup = self.shards[:cut + 1], None
        out.layouts = self.layouts[:cut] + [self.layouts[cut].first(count - sum(self.counts[:cut]))]
        return out

    def shard_order(self, seed: int | None, stage: int, epoch: int) -> list[int]:
        """The shards' indices in the order epoch ``epoch`` of stage ``stage`` visits them (``seed`` None: as given)."""
        if seed is None or not self.shuffle_shards:
            return list(range(len(self.shards)))
        g = torch.Generator().manual_seed(mix_seed(seed, stage, epoch, 0x5A4D))
        return torch.randperm(len(self.shards), generator=g).tolist()

    def reader(self, seed: int | None, stage: int) -> Callable[[int], Item]:
        return _ShardReader(self, seed, stage)


@dataclass
class ShardLayout:
    """Where a shard's samples are: ``keys[j]`` (webdataset keys), and for field ``f`` of the stream
    (x0, cond) the member extension ``exts[ext_ids[j, f]]`` and its data ``spans[j, f] = (offset, size)``
    in the file. Arrays: about 45 bytes a sample, shared by forked loader workers."""

    keys: np.ndarray
    spans: np.ndarray
    ext_ids: np.ndarray
    exts: list[str]

    @property
    def count(self) -> int:
        return len(self.keys)

    def first(self, count: int) -> ShardLayout:
        return ShardLayout(self.keys[:count], self.spans[:count], self.ext_ids[:count], self.exts)


DAMAGED = "damaged shard"
"""How :func:`list_samples` names a damaged shard in its notes."""

Field = str | tuple[str, ...]
"""A sample's field in a shard: the name its members carry (``x0`` of ``KEY.x0.pth``), or several alternatives
(an image as ``jpg``, ``png``, ...; the first present is taken)."""


def field_name(field: Field) -> str:
    return field if isinstance(field, str) else "/".join(field)


def list_samples(path: Path, fields: Sequence[Field]) -> tuple[ShardLayout, str]:
    """The layout of a shard's samples that have every field, in file order, from its tar headers (webdataset's
    key rule: ``KEY.x0.pth`` is field ``x0`` of sample ``KEY``; names compared in lower case); and what is
    damaged ('' if nothing). A truncated or damaged shard keeps every complete sample whose members lie whole
    in the file before the damage."""
    from webdataset.tariterators import base_plus_ext

    groups: list[tuple[str, dict]] = []
    damage = ""
    try:
        size = path.stat().st_size
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    damage = f"ends early (inside {member.name})"
                    break
                key, ext = base_plus_ext(member.name)
                if key is None:
                    continue
                if not groups or groups[-1][0] != key:
                    groups.append((key, {}))
                groups[-1][1].setdefault(ext.split(".")[0].lower(), (ext, member.offset_data, member.size))
    except (tarfile.TarError, EOFError, OSError) as err:
        damage = f"{type(err).__name__}: {err}" if not groups else f"ends early ({type(err).__name__}: {err})"
    alternatives = [(f,) if isinstance(f, str) else tuple(f) for f in fields]
    complete = []
    for key, members in groups:
        chosen = [next((members[name] for name in names if name in members), None) for names in alternatives]
        if all(c is not None for c in chosen):
            complete.append((key, chosen))
    lacking = len(groups) - len(complete)
    notes = ([f"{DAMAGED} ({damage}); {len(complete)} complete samples before the damage kept"] if damage
             else []) + ([f"{lacking} samples without {' and '.join(map(field_name, fields))} left out"]
                         if lacking else [])
    exts = sorted({ext for _, members in complete for ext, _, _ in members})
    layout = ShardLayout(np.array([key for key, _ in complete], dtype=np.bytes_).reshape(-1),
                         np.array([[(o, n) for _, o, n in members] for _, members in complete],
                                  dtype=np.int64).reshape(-1, len(fields), 2),
                         np.array([[exts.index(e) for e, _, _ in members] for _, members in complete],
                                  dtype=np.int16).reshape(-1, len(fields)), exts)
    return layout, "; ".join(notes)


INDEX_FORMAT = 2  # 2: a damaged shard keeps its last complete sample


def read_index(path: str | Path, fields: Sequence[str]) -> dict[str, tuple[list, ShardLayout, str]]:
    """A shard index (:func:`write_index`): ``{path: ([path, size, mtime_ns], layout, damage)}``; empty
    when the file is absent or was written for other fields or another format."""
    path = Path(path)
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        if meta.get("format") != INDEX_FORMAT or meta.get("fields") != list(fields):
            return {}
        keys, spans, ext_ids = data["keys"], data["spans"], data["ext_ids"]
    entries, start = {}, 0
    for shard in meta["shards"]:
        end = start + shard["count"]
        layout = ShardLayout(keys[start:end], spans[start:end], ext_ids[start:end], shard["exts"])
        entries[shard["fingerprint"][0]] = (shard["fingerprint"], layout, shard["damage"])
        start = end
    return entries


def write_index(path: str | Path, fields: Sequence[str], entries: Sequence[tuple[list, ShardLayout, str]]) -> None:
    """Write shards' layouts as one ``.npz`` (atomically): their concatenated arrays and a JSON ``meta``."""
    meta = {"format": INDEX_FORMAT, "fields": list(fields),
            "shards": [{"fingerprint": fp, "count": layout.count, "exts": layout.exts, "damage": damage}
                       for fp, layout, damage in entries]}
    arrays = {name: np.concatenate([getattr(layout, name) for _, layout, _ in entries])
              for name in ("keys", "spans", "ext_ids")}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


class _ShardReader:
    """Items at stream positions of a ShardStream: seeks to each sample's members (its layout)."""

    def __init__(self, stream: ShardStream, seed: int | None, stage: int):
        self.stream, self.seed, self.stage = stream, seed, stage
        self.epoch, self.order, self.starts = -1, [], []
        self.shard, self.file = -1, None

    def _epoch(self, epoch: int) -> None:
        s = self.stream
        self.epoch = epoch
        self.order = s.shard_order(self.seed, self.stage, epoch)
        self.starts = [0, *itertools.accumulate(s.counts[j] for j in self.order)]

    def _open(self, shard: int) -> None:
        if self.file is not None:
            self.file.close()
        self.shard, self.file = shard, open(self.stream.shards[shard], "rb")

    def _decode(self, row: int) -> Item:
        layout = self.stream.layouts[self.shard]
        sample = {}
        for (offset, size), ext_id in zip(layout.spans[row].tolist(), layout.ext_ids[row].tolist(), strict=True):
            self.file.seek(offset)
            sample[layout.exts[ext_id]] = self.file.read(size)
        values = list(_decoder()(sample).values())
        return torch.as_tensor(values[0]), (values[1] if len(values) > 1 else None)

    def __call__(self, p: int) -> Item:
        s = self.stream
        epoch, offset = divmod(p, len(s))
        if epoch != self.epoch:
            self._epoch(epoch)
        j = bisect.bisect_right(self.starts, offset) - 1
        shard, row = self.order[j], offset - self.starts[j]
        if shard != self.shard:
            self._open(shard)
        names = [f"{path}: {why}" for path, why in s.left_out.items()] if offset == 0 else []
        layout = s.layouts[shard]
        for k in range(layout.count):  # the sample, or the next readable one of its shard
            try:
                x0, cond = self._decode((row + k) % layout.count)
                return (x0, cond, names) if names else (x0, cond)
            except Exception as err:  # any undecodable sample is skipped and named
                key = layout.keys[(row + k) % layout.count].decode()
                names.append(f"{s.shards[shard]}:{key} ({type(err).__name__}: {err})")
        raise RuntimeError(f"no sample of {s.shards[shard]} can be decoded; first errors: {names[:3]}")


class IterableStream(Stream):
    """Any re-iterable of ``(x0, cond)`` items as a stream (module doc).

    source: a list, a torch ``IterableDataset``, a ``datasets.IterableDataset`` (streaming split), ...;
        each ``iter(source)`` must start a new pass (a one-shot generator or iterator is refused).
    num_items: items per pass (default: counted by one pass); every pass must give that many.
    to_item: turns a raw item into ``(x0, cond)`` (e.g. a ``datasets`` row dict); default: as it is.
    """

    def __init__(self, source: Iterable, num_items: int | None = None, to_item: Callable[[Any], Item] | None = None):
        if not isinstance(source, Iterable) or iter(source) is source:
            raise ValueError(f"IterableStream needs a re-iterable source (a list, a dataset, ...), got a "
                             f"{type(source).__name__}: each epoch iterates it again; wrap a generator in a "
                             "class whose __iter__ calls it")
        self.source, self.to_item = source, to_item
        self.num_items = num_items if num_items is not None else sum(1 for _ in self._pass(0))
        if self.num_items < 1:
            raise ValueError("the iterable training data gave no items")

    def _pass(self, epoch: int) -> Iterator:
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)
        return iter(self.source)

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, i: int) -> Item:
        """Item ``i`` of the first pass (reads ``i + 1`` items; for validation grids)."""
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} of a stream of {len(self)} items")
        return self.reader(None, 0)(i)

    def limited(self, count: int) -> IterableStream:
        if count >= self.num_items:
            return self
        out = object.__new__(IterableStream)
        out.__dict__.update(self.__dict__)
        out.num_items = count
        return out

    def micro_batches(self, plan: BatchPlan, start_step: int, num_workers: int = 0) -> Iterator[tuple]:
        if num_workers:
            raise ValueError(f"num_workers: {num_workers}: an IterableStream is read in the training process (each "
                             "loader worker would read the whole iterable again); set num_workers: 0, or write the "
                             "data as shards (proreflow.training.streams.write_shards) and use a ShardStream")
        return super().micro_batches(plan, start_step, 0)

    def reader(self, seed: int | None, stage: int) -> Callable[[int], Item]:
        state = {"epoch": -1, "offset": 0, "items": iter(())}

        def item(p: int) -> Item:
            epoch, offset = divmod(p, self.num_items)
            if epoch != state["epoch"] or offset < state["offset"]:
                state.update(epoch=epoch, offset=0, items=itertools.islice(self._pass(epoch), self.num_items))
            for _ in range(offset - state["offset"]):  # items of other processes, or before a resume
                self._next(state)
            raw = self._next(state)
            return tuple(self.to_item(raw)) if self.to_item is not None else tuple(raw)

        return item

    def _next(self, state: dict) -> Any:
        try:
            raw = next(state["items"])
        except StopIteration:
            raise ValueError(f"pass {state['epoch']} over the iterable training data ended after {state['offset']} "
                             f"items, but the stream has {self.num_items} per epoch: every pass must give the same "
                             "items (num_items)") from None
        state["offset"] += 1
        return raw


def check_dataset(dataset: Any) -> None:
    """A ValueError naming the fix when ``dataset`` is neither map-style nor a :class:`Stream`."""
    if isinstance(dataset, Stream):
        return
    if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise ValueError(f"the training dataset ({type(dataset).__name__}) must be map-style (__len__ and "
                         "__getitem__) or a stream: wrap an iterable in proreflow.training.streams.IterableStream, "
                         "or read webdataset shards with ShardStream")
