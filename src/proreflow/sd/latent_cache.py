"""Latents and text conditions of training data, encoded on the fly or cached on disk.

Items are ``(latents (C, h, w) float32, cond)`` with ``cond`` the teacher's condition dict
without its batch dimension (what a ``DistillationSetup`` dataset yields). Two encoders turn
a batch of raw items into them, each drawing item ``i``'s randomness from a generator seeded
by ``(seed, i)``, so the on-the-fly and the cached datasets give the same latents:

- :func:`encode_items` (images with captions): a sample of the VAE posterior of the image;
- :func:`generate_items` (prompt-only data): the teacher's own sample for the prompt, a DDIM
  solve from noise at t = 1 to t = 0 with guidance. Training then noises it to the window
  start, so the start points come from the teacher's distribution, not from real images.

Cache layout (``build_latent_cache``, by all processes: each encodes a contiguous part of the items)::

    DIR/shard-00000.safetensors   latents and the condition leaves (encoder_hidden_states[, text_embeds, time_ids,
                                  encoder_attention_mask, resolution, ...]), in item order
    DIR/manifest.json             what was encoded (teacher, data, resolution, ...), shard sizes,
                                  and the images skipped as unreadable; written last

The manifest's settings key the cache on what it encodes: the teacher, the data path, the
resolution and the other preprocessing settings; the data files (:func:`files_fingerprint`:
their count, sizes and modification times); the encoders and their dtype. A cache without a
manifest is incomplete and is rebuilt; one whose files or encoders changed is stale and is
rebuilt with a warning naming what changed (:data:`REBUILD_KEYS`); one built for other settings
(another teacher, data path, resolution, ...) is another cache and is refused with the keys named.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..conditioning import Cond, map_cond
from ..files import atomic_write, write_json
from ..sampling import sample
from ..teachers import Denoiser
from ..windows import TimeWindows
from .pipeline import SDTeacher, sdxl_time_ids, unet_network

Encoder = Callable[[list[dict]], tuple[Tensor, dict]]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CACHE_FORMAT = 1
REBUILD_KEYS = ("files", "encoder", "encoder_dtype")
"""Settings whose change makes a cache stale, rebuilt: what it was encoded from and with."""


def files_fingerprint(paths: list[str | Path], exclude: str | Path | None = None) -> dict:
    """The files a cache encodes: count, total bytes and a SHA-256 of every ``(path, size, mtime)``.

    paths: files and folders (walked recursively); files under ``exclude`` (the cache folder, when
    it lies inside the data) are left out. Adding, removing, replacing or touching a file changes it.
    """
    exclude = Path(exclude).resolve() if exclude is not None else None
    lines, total = [], 0
    for root in map(Path, paths):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root] if root.is_file() else []
        for f in files:
            if exclude is not None and f.resolve().is_relative_to(exclude):
                continue
            stat = f.stat()
            total += stat.st_size
            lines.append(f"{f.relative_to(root) if root.is_dir() else f}\t{stat.st_size}\t{stat.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    return {"count": len(lines), "bytes": total, "sha256": digest}


def item_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of item ``index``'s VAE posterior sample."""
    return torch.Generator().manual_seed((int(seed) << 32) + int(index))


@torch.no_grad()
def encode_items(teacher: SDTeacher, items: list[dict], seed: int, resolution: int) -> tuple[Tensor, dict]:
    """Latents and condition dict (with batch dimension) of items of an :class:`ImageCaptionDataset`."""
    pixels = torch.stack([item["pixels"] for item in items])
    latents = teacher.encode_images(pixels, [item_generator(seed, item["index"]) for item in items])
    time_ids = None
    if teacher.is_sdxl:
        time_ids = torch.stack([sdxl_time_ids(item["original_size"], item["crop_top_left"], (resolution, resolution))
                                for item in items])
    cond = teacher.encode_prompts([item["caption"] for item in items], time_ids)
    return latents, cond


@torch.no_grad()
def generate_items(teacher: SDTeacher, items: list[dict], seed: int, resolution: int, steps: int,
                   guidance: float) -> tuple[Tensor, dict]:
    """Teacher samples (latents) and condition dict of prompt-only items (module doc)."""
    shape = teacher.latent_shape(resolution)
    noise = torch.stack([torch.randn(shape, generator=item_generator(seed, item["index"])) for item in items])
    time_ids = teacher.default_time_ids(resolution).expand(len(items), -1) if teacher.is_sdxl else None
    cond = teacher.encode_prompts([item["caption"] for item in items], time_ids)
    unet = teacher.unet  # the engine may have cast it to the training dtype by now
    denoiser = Denoiser(unet_network(unet), teacher.prediction_type, teacher.schedule, dtype=unet.dtype)
    latents = sample(denoiser, noise.to(teacher.device), TimeWindows(steps), steps, cond, teacher.null_cond(), guidance)
    return latents, cond


class EncodedDataset(Dataset):
    """Encodes each item when it is read, with ``encode`` (e.g. a partial of :func:`encode_items`).

    Runs the encoders in the reading process: use ``num_workers = 0`` when they are on a GPU.
    The cache (:func:`build_latent_cache`) avoids the repeated encoding.
    """

    def __init__(self, items: Dataset, encode: Encoder):
        self.items, self.encode = items, encode

    @property
    def skipped(self) -> dict[str, str]:
        return self.items.skipped

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, Cond] | tuple[Tensor, Cond, list[str]]:
        """``(latents, cond)``, with the names of the items skipped to reach it as a third element if any
        (the engine counts them: :class:`~proreflow.training.setup.DistillationSetup`)."""
        item = self.items[i]
        latents, cond = self.encode([item])
        latents, cond = latents[0].float().cpu(), map_cond(lambda a: a[0].float().cpu(), cond)
        skipped = item.get("skipped_before") or []
        return (latents, cond, list(skipped)) if skipped else (latents, cond)


ADDED_COND_KEYS = ("text_embeds", "time_ids", "resolution", "aspect_ratio")
"""Leaves of ``added_cond_kwargs``: SDXL's pooled text and micro-conditioning, PixArt-alpha's size conditions."""

EXACT_KEYS = ("time_ids", "resolution", "aspect_ratio")
"""Micro-conditioning leaves (image sizes, crops, aspect ratios): stored in float32, not the cache's dtype."""


def _flatten(cond: dict) -> dict[str, Tensor]:
    """Condition dict -> flat tensor names of a shard: the ``added_cond_kwargs`` leaves (SDXL, PixArt-alpha)
    by their own names, every other entry (``encoder_hidden_states``, SD3's ``pooled_projections``,
    PixArt's ``encoder_attention_mask``) as it is."""
    flat = {key: value for key, value in cond.items() if key != "added_cond_kwargs"}
    flat.update(cond.get("added_cond_kwargs", {}))
    return flat


def _nest(flat: dict[str, Tensor]) -> dict:
    cond = {key: value for key, value in flat.items() if key not in ADDED_COND_KEYS}
    added = {key: flat[key] for key in ADDED_COND_KEYS if key in flat}
    if added:
        cond["added_cond_kwargs"] = added
    return cond


class _Loads(Dataset):
    """``items.load(i)`` for ``i`` in ``indices``, for a DataLoader: items, or skip records, never an exception."""

    def __init__(self, items: Dataset, indices: range):
        self.items, self.indices = items, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.items.load(self.indices[i])


def read_manifest(cache_dir: str | Path) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def check_manifest(manifest: dict, settings: dict, cache_dir: str | Path) -> bool:
    """True when the cache matches ``settings``; False when it is stale (only :data:`REBUILD_KEYS`
    differ: logged, to be rebuilt); refuses a cache built for other settings, naming the keys."""
    differ = {k: (manifest["settings"].get(k), v) for k, v in settings.items() if manifest["settings"].get(k) != v}
    detail = "; ".join(f"{k}: cache {a!r}, now {b!r}" for k, (a, b) in differ.items())
    if set(differ) - set(REBUILD_KEYS):
        raise ValueError(f"the latent cache {cache_dir} was built with other settings ({detail}); "
                         "use another cache_dir or delete this one to rebuild it")
    if differ:
        log.warning("latent cache %s is stale (%s): rebuilding it", cache_dir, detail)
    return not differ


def part_range(count: int, rank: int, num_processes: int) -> range:
    """The items process ``rank`` of ``num_processes`` encodes: the ``rank``-th of equal contiguous parts."""
    return range(rank * count // num_processes, (rank + 1) * count // num_processes)


def encode_part(items: Dataset, encode: Encoder, cache_dir: Path, rank: int = 0, num_processes: int = 1,
                batch_size: int = 16, shard_size: int = 4096, dtype: torch.dtype = torch.float16,
                num_workers: int = 0, progress: bool = True) -> dict:
    """Encode process ``rank``'s items (:func:`part_range`) into ``part-RANK-K.safetensors`` shards of
    ``cache_dir``, and record them in ``part-RANK.json``: ``{"shards": [{file, count}], "skipped": {...}}``."""
    indices = part_range(len(items), rank, num_processes)
    loader = DataLoader(_Loads(items, indices), batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    shards, pending, skipped = [], [], {}

    def flush() -> None:
        nonlocal pending
        if not pending:
            return
        tensors = {k: torch.cat([p[k] for p in pending]).contiguous() for k in pending[0]}
        name = f"part-{rank:05d}-{len(shards):05d}.safetensors"
        atomic_write(cache_dir / name, lambda tmp: save_file(tensors, str(tmp)))
        shards.append({"file": name, "count": int(tensors["latents"].shape[0])})
        pending = []

    for batch in tqdm(loader, desc=f"caching latents in {cache_dir}", unit="batch", disable=not progress):
        good = [item for item in batch if "skipped" not in item]
        for item in batch:
            if "skipped" in item:
                skipped[item["skipped"]] = item["error"]
                log.warning("skipping unreadable image %s (%s)", item["skipped"], item["error"])
        if not good:
            continue
        latents, cond = encode(good)
        flat = {"latents": latents, **_flatten(cond)}
        pending.append({k: v.to("cpu", torch.float32 if k in EXACT_KEYS else dtype) for k, v in flat.items()})
        if sum(p["latents"].shape[0] for p in pending) >= shard_size:
            flush()
    flush()
    part = {"shards": shards, "skipped": skipped}
    write_json(cache_dir / f"part-{rank:05d}.json", part)
    return part


def build_latent_cache(items: Dataset, encode: Encoder, cache_dir: str | Path, settings: dict,
                       batch_size: int = 16, shard_size: int = 4096, dtype: torch.dtype = torch.float16,
                       num_workers: int = 0, state=None) -> dict:
    """Encode every readable item once into safetensors shards (module doc); return the manifest.

    ``items``: an :class:`ImageCaptionDataset` or :class:`PromptDataset` (their ``load``);
    ``encode``: :func:`encode_items` or :func:`generate_items` bound to a teacher.
    ``settings`` (JSON values: teacher, data, resolution, seed, ...) are stored and compared on
    reuse. Items are read by ``num_workers`` loader processes; the encoders run here.

    state: an ``accelerate.PartialState`` (None: this process alone). Called by every process of it,
    each encodes its contiguous part of the items (:func:`encode_part`) with its own encoders; the main
    process then names the shards ``shard-NNNNN`` in item order and writes the manifest. Item ``i``'s
    randomness is seeded by ``i``, so the cache holds the same rows for any number of processes (up to
    the encoders' rounding for another batch composition).
    """
    cache_dir = Path(cache_dir)
    rank, processes = (state.process_index, state.num_processes) if state is not None else (0, 1)
    main = rank == 0
    if main:
        if cache_dir.exists():
            shutil.rmtree(cache_dir)  # no manifest: an interrupted build
        cache_dir.mkdir(parents=True)
    barrier = state.wait_for_everyone if state is not None else (lambda: None)
    barrier()
    encode_part(items, encode, cache_dir, rank, processes, batch_size, shard_size, dtype, num_workers, main)
    barrier()
    parts = [json.loads((cache_dir / f"part-{r:05d}.json").read_text()) for r in range(processes)]
    barrier()  # every process has read the parts before the main process renames and removes them
    skipped = {name: why for part in parts for name, why in part["skipped"].items()}
    written = [shard for part in parts for shard in part["shards"]]
    if not written:
        raise RuntimeError(f"none of the {len(items)} items could be read; first errors: "
                           f"{dict(list(skipped.items())[:3])}")
    shards = [{"file": f"shard-{k:05d}.safetensors", "count": shard["count"]} for k, shard in enumerate(written)]
    total = sum(shard["count"] for shard in shards)
    manifest = {"format": CACHE_FORMAT, "settings": settings, "count": total, "shards": shards, "skipped": skipped}
    if main:
        for old, new in zip(written, shards, strict=True):
            (cache_dir / old["file"]).rename(cache_dir / new["file"])
        for r in range(processes):
            (cache_dir / f"part-{r:05d}.json").unlink()
        write_json(cache_dir / MANIFEST, manifest)
        if skipped:
            log.warning("latent cache %s: %d images encoded, %d unreadable images skipped", cache_dir, total,
                        len(skipped))
    barrier()
    return manifest


class LatentCacheDataset(Dataset):
    """Items ``(latents, cond)`` read row by row from a cache (float32; shards opened lazily per process)."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        manifest = read_manifest(self.cache_dir)
        if manifest is None:
            raise FileNotFoundError(f"{self.cache_dir} holds no complete latent cache (no {MANIFEST})")
        if manifest.get("format") != CACHE_FORMAT:
            raise ValueError(f"{self.cache_dir}: cache format {manifest.get('format')} is not {CACHE_FORMAT}; "
                             "delete it to rebuild")
        self.manifest = manifest
        self.skipped: dict[str, str] = manifest["skipped"]
        self.index = [(s, row) for s, shard in enumerate(manifest["shards"]) for row in range(shard["count"])]
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _shard(self, s: int):
        if s not in self._handles:
            self._handles[s] = safe_open(str(self.cache_dir / self.manifest["shards"][s]["file"]), framework="pt")
        return self._handles[s]

    def __getitem__(self, i: int) -> tuple[Tensor, Cond]:
        s, row = self.index[i]
        f = self._shard(s)
        flat = {k: f.get_slice(k)[row:row + 1][0].float() for k in f.keys()}
        latents = flat.pop("latents")
        return latents, _nest(flat)

    def __getstate__(self) -> dict:  # open handles stay in their process
        return {**self.__dict__, "_handles": {}}


def latent_dataset(items: Dataset, encode: Encoder, settings: dict, cache_dir: str | Path | None = None,
                   batch_size: int = 16, num_workers: int = 0) -> EncodedDataset | LatentCacheDataset:
    """``items`` encoded on the fly, or with ``cache_dir`` once into a cache, built by all processes
    (each its part: :func:`build_latent_cache`) and reused while its manifest matches ``settings``
    (rebuilt when stale, refused for other settings: :func:`check_manifest`): the dataset of any
    latent-space family's setup. The process state is the one the engine's accelerator will have
    (:func:`~proreflow.training.environment.process_state`), so several processes share one cache."""
    from ..training.environment import process_state

    if cache_dir is None:
        return EncodedDataset(items, encode)
    state = process_state()
    manifest = read_manifest(cache_dir)
    current = manifest is not None and check_manifest(manifest, settings, cache_dir)
    state.wait_for_everyone()  # every process has read the manifest before a rebuild removes it
    if not current:
        build_latent_cache(items, encode, cache_dir, settings, batch_size=batch_size, num_workers=num_workers,
                           state=state)
    return LatentCacheDataset(cache_dir)
