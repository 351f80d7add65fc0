"""Image-caption sources for text-to-image distillation, and the training-script preprocessing.

Three kinds of source, one interface (``len(source)``, ``source.record(i) -> Record``):

- ``FolderSource``: a folder of images with a caption each, either a ``.txt`` file with the
  image's stem beside it, or a ``metadata.jsonl`` (Hugging Face ``imagefolder`` convention:
  one ``{"file_name": ..., "text": ...}`` per line; ``caption`` / ``prompt`` also accepted).
- ``TarShardSource``: webdataset tar shards (LAION style ``KEY.jpg`` + ``KEY.txt``), given as
  a brace pattern (``data/{00000..00099}.tar``), a folder of ``.tar`` files or one file. The
  shards are indexed once so that items are read by random access (any sampler, DDP); a truncated
  shard keeps the samples before the damage.
- ``HFDatasetSource``: a local ``datasets`` dataset (``save_to_disk`` folder, or anything
  ``load_dataset`` reads from disk) with an image column and a caption column.

Prompt-only data (:class:`PromptDataset`, :func:`read_prompts`): a ``.txt`` file with one
prompt per line, or a ``.jsonl`` with a caption key per line.

:class:`ImageCaptionDataset` decodes and preprocesses as diffusers' ``train_text_to_image*``
scripts do: RGB, resize the shorter side to ``resolution`` (bilinear, antialiased), center or
random crop to ``resolution x resolution``, optional horizontal flip, pixels in [-1, 1]; it
also returns the SDXL micro-conditioning (original size, crop top-left). An image that cannot
be read or decoded (corrupt, truncated, missing) is skipped, logged with its reason and counted
in ``dataset.skipped``: the item is replaced by the next readable one, so a run never stops on
bad files. So is an image whose decoded or resized size would exceed :data:`MAX_PIXELS` (checked
from its header, before decoding). Captions that are not UTF-8, bad lines of ``metadata.jsonl``
(named by file:line) and damaged ``.tar`` shards are left out with a warning and counted
(``source.left_out``).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ..training.streams import DAMAGED, expand_shards, list_samples

log = logging.getLogger(__name__)

MAX_PIXELS = 2**26
"""The most pixels (about 8192 x 8192) an image may have, decoded or after its resize; a larger one
(a 1 x 20000 px strip resized to 512 px on its short side is 512 x 10,240,000) is skipped."""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_KEYS = ("text", "caption", "prompt")


@dataclass
class Record:
    """One item of a source: a name for messages, its caption and how to open its image."""

    name: str
    caption: str
    open: Callable[[], Image.Image]


def _bytes_opener(read: Callable[[], bytes]) -> Callable[[], Image.Image]:
    return lambda: Image.open(io.BytesIO(read()))


def _is_caption(value) -> bool:
    """A caption field holds text, or a list of texts (COCO style)."""
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))


def _first_caption(value) -> str:
    """A caption field may hold a list of captions (COCO style): the first one is used."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return "" if value is None else str(value).strip()


class FolderSource:
    """Images with ``.txt`` captions beside them, or a ``metadata.jsonl`` (see module doc)."""

    def __init__(self, root: str | Path, caption_column: str | None = None):
        self.root = Path(root).expanduser()
        self.left_out: dict[str, str] = {}
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        metadata = self.root / "metadata.jsonl"
        self.items = self._from_metadata(metadata, caption_column) if metadata.is_file() else self._from_txt()
        first = next(iter(self.left_out.items()), None)
        if not self.items:
            raise ValueError(f"{self.root} holds no captioned images: put KEY.txt beside each image "
                             f"({', '.join(IMAGE_EXTENSIONS)}) or a metadata.jsonl with file_name and text"
                             + (f" ({len(self.left_out)} left out; first: {first[0]}: {first[1]})" if first else ""))
        if first:
            log.warning("%s: %d captions left out (first: %s: %s)", self.root, len(self.left_out), *first)

    def _from_metadata(self, path: Path, caption_column: str | None) -> list[tuple[Path, str]]:
        items = []
        for n, row in read_json_lines(path, self.left_out, warn=False):
            key = caption_column or next((k for k in CAPTION_KEYS if k in row), None)
            if "file_name" not in row or key not in row:
                self.left_out[f"{path}:{n}"] = (f"each line needs 'file_name' and a caption "
                                                f"({caption_column or ' / '.join(CAPTION_KEYS)}), got keys "
                                                f"{sorted(row)}")
            elif not _is_caption(row[key]) or not isinstance(row["file_name"], str):
                self.left_out[f"{path}:{n}"] = (f"'file_name' must be a path and {key!r} a caption (text, or a "
                                                f"list of texts), got {row['file_name']!r} and {row[key]!r}")
            else:
                items.append((path.parent / row["file_name"], _first_caption(row[key])))
        return items

    def _from_txt(self) -> list[tuple[Path, str]]:
        images = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        items = []
        for p in images:
            if p.with_suffix(".txt").is_file():
                try:
                    items.append((p, p.with_suffix(".txt").read_bytes().decode("utf-8").strip()))
                except UnicodeDecodeError as err:
                    self.left_out[str(p.with_suffix(".txt"))] = (f"caption is not UTF-8 ({err.reason} at byte "
                                                                 f"{err.start})")
                except OSError as err:
                    self.left_out[str(p.with_suffix(".txt"))] = f"caption cannot be read ({err})"
        if len(items) + len(self.left_out) < len(images):
            log.warning("%s: %d of %d images have no .txt caption beside them and are left out",
                        self.root, len(images) - len(items), len(images))
        return items

    def __len__(self) -> int:
        return len(self.items)

    def record(self, i: int) -> Record:
        path, caption = self.items[i]
        return Record(str(path), caption, lambda: Image.open(path))


IMAGE_AND_CAPTION = (("jpg", "jpeg", "png", "webp"), "txt")
"""The fields of a captioned sample in a webdataset shard (:func:`~proreflow.training.streams.list_samples`)."""


class TarShardSource:
    """webdataset tar shards, indexed for random access (see module doc).

    Members are grouped by webdataset's key rule (``base_plus_ext``: the key is the path up to
    the first dot of the file name); a sample needs an image member and a ``txt`` member.
    """

    def __init__(self, shards: str | Path | Sequence[str]):
        self.shards = expand_shards(shards)
        self.items: list[tuple[int, str, tuple[int, int], tuple[int, int]]] = []
        self.left_out: dict[str, str] = {}
        for s, shard in enumerate(self.shards):
            layout, notes = list_samples(shard, IMAGE_AND_CAPTION)
            if notes:
                self.left_out[str(shard)] = notes
            self.items += [(s, key.decode(), tuple(image), tuple(txt))
                           for key, (image, txt) in zip(layout.keys, layout.spans.tolist(), strict=True)]
        damaged = sum(DAMAGED in notes for notes in self.left_out.values())
        first = next(iter(self.left_out.items()), None)
        if not self.items:
            raise ValueError(f"no samples with an image (jpg/png/webp) and a txt caption in "
                             f"{len(self.shards)} shard(s) ({damaged} damaged"
                             + (f"; first: {first[0]}: {first[1]})" if first else ")"))
        for shard, notes in self.left_out.items():  # said once there is something to train on
            log.warning("shard %s: %s", shard, notes)
        if damaged:
            log.warning("%d of %d shards damaged: the complete samples before each damage are kept", damaged,
                        len(self.shards))

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, shard: int, where: tuple[int, int]) -> bytes:
        with open(self.shards[shard], "rb") as f:
            f.seek(where[0])
            return f.read(where[1])

    def record(self, i: int) -> Record:
        shard, key, image, txt = self.items[i]
        caption = self._read(shard, txt).decode("utf-8", errors="replace").strip()
        return Record(f"{self.shards[shard]}:{key}", caption, _bytes_opener(lambda: self._read(shard, image)))


class HFDatasetSource:
    """A local ``datasets`` dataset with an image column and a caption column."""

    def __init__(self, path: str | Path, image_column: str = "image", caption_column: str | None = None,
                 split: str = "train"):
        import datasets

        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"dataset folder {path} does not exist")
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise KeyError(f"{path} has splits {list(ds)}, not {split!r}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(str(path), split=split)
        caption_column = caption_column or next((k for k in CAPTION_KEYS if k in ds.column_names), None)
        for column in (image_column, caption_column):
            if column not in ds.column_names:
                raise KeyError(f"{path}: no column {column!r} (columns: {ds.column_names}); "
                               "set image_column / caption_column")
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))  # decode here, to skip bad files
        self.ds, self.path = ds, path
        self.image_column, self.caption_column = image_column, caption_column

    def __len__(self) -> int:
        return len(self.ds)

    def record(self, i: int) -> Record:
        row = self.ds[i]
        value = row[self.image_column]
        if isinstance(value, dict) and value.get("bytes"):
            opener = _bytes_opener(lambda: value["bytes"])
        elif isinstance(value, dict) or isinstance(value, str):
            file = value["path"] if isinstance(value, dict) else value
            opener = lambda: Image.open(file)  # noqa: E731
        elif isinstance(value, Image.Image):
            opener = lambda: value  # noqa: E731
        else:
            raise TypeError(f"{self.path}: column {self.image_column!r} holds {type(value).__name__}, "
                            "not an image, image bytes or a path")
        return Record(f"{self.path}[{i}]", _first_caption(row[self.caption_column]), opener)


def open_source(spec: str | Path | Sequence[str], kind: str = "auto", image_column: str = "image",
                caption_column: str | None = None):
    """A source from a path and a kind: ``folder``, ``webdataset``, ``datasets`` or ``auto``.

    ``auto``: ``.tar`` files, brace patterns or a folder of ``.tar`` files are webdataset; a
    ``save_to_disk`` folder is datasets; any other folder is an image-caption folder.
    ``caption_column`` (folder metadata, datasets) and ``image_column`` (datasets) name columns.
    """
    if kind == "auto":
        text = str(spec) if isinstance(spec, (str, Path)) else str(spec[0])
        path = Path(text).expanduser()
        if "{" in text or text.endswith(".tar") or not isinstance(spec, (str, Path)) or (
                path.is_dir() and any(path.glob("*.tar"))):
            kind = "webdataset"
        elif path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            kind = "datasets"
        else:
            kind = "folder"
    if kind == "folder":
        return FolderSource(spec, caption_column)
    if kind == "webdataset":
        return TarShardSource(spec)
    if kind == "datasets":
        return HFDatasetSource(spec, image_column, caption_column)
    raise ValueError(f"unknown data kind {kind!r}: use auto, folder, webdataset or datasets")


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool = True, flip: bool = False,
                    generator: torch.Generator | None = None) -> tuple[Tensor, tuple[int, int], tuple[int, int]]:
    """diffusers' training transform: ``(pixels in [-1, 1] (3, r, r), original (h, w), crop top-left (y, x))``.

    Shorter side resized to ``r`` (bilinear; the longer side ``int(r * long / short)`` as
    torchvision's ``Resize(r)``), then a center crop (``round((h - r) / 2)``) or a uniform random
    crop, then an optional horizontal flip, which moves the crop's x to ``w - x - r`` (SDXL script).
    """
    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    size_long = int(resolution * long / short)
    new_w, new_h = (resolution, size_long) if w <= h else (size_long, resolution)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if center_crop:
        y, x = int(round((new_h - resolution) / 2.0)), int(round((new_w - resolution) / 2.0))
    else:
        y = int(torch.randint(new_h - resolution + 1, (), generator=generator))
        x = int(torch.randint(new_w - resolution + 1, (), generator=generator))
    image = image.crop((x, y, x + resolution, y + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = new_w - x - resolution
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return pixels, (h, w), (y, x)


def decode(record: Record, resolution: int | None = None) -> Image.Image:
    """Open and fully decode the image (a truncated file fails here, not later); with ``resolution``,
    first check from its header that neither it nor its resize exceeds :data:`MAX_PIXELS`."""
    image = record.open()
    if resolution is not None:
        w, h = image.size
        short, long = min(w, h), max(w, h)
        resized = resolution * int(resolution * long / max(short, 1))
        if w * h > MAX_PIXELS or resized > MAX_PIXELS or short < 1:
            raise ValueError(f"{w} x {h} px image (resized: {resized:,} px) exceeds the limit of {MAX_PIXELS:,} px")
    image.load()
    return image


class ImageCaptionDataset(Dataset):
    """Preprocessed items ``{"index", "pixels", "caption", "original_size", "crop_top_left", "skipped_before"}``
    of a source.

    Unreadable images are skipped (module doc): ``skipped`` maps their names to the error, in
    this process; each item's ``skipped_before`` names the images skipped to reach it, so that
    they travel with it out of a loader worker.
    """

    def __init__(self, source, resolution: int, center_crop: bool = True, random_flip: bool = False):
        self.source, self.resolution = source, resolution
        self.center_crop, self.random_flip = center_crop, random_flip
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.source)

    def load(self, i: int) -> dict:
        """Item ``i``, or ``{"skipped": name, "error": reason}`` if its image cannot be read."""
        record = self.source.record(i)
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        try:
            image = decode(record, self.resolution)
            pixels, original_size, crop = resize_and_crop(image, self.resolution, self.center_crop, flip)
        except Exception as err:  # any decoder error: PIL raises OSError, ValueError, SyntaxError, ...
            return {"skipped": record.name, "error": f"{type(err).__name__}: {err}"}
        return {"index": i, "pixels": pixels, "caption": record.caption, "original_size": original_size,
                "crop_top_left": crop}

    def __getitem__(self, i: int) -> dict:
        """Item ``i``, or the next readable one after it, with ``skipped_before``: the names passed over."""
        passed: list[str] = []
        new: list[str] = []  # logged once a readable item shows the data is not wholly unreadable
        for k in range(len(self)):
            item = self.load((i + k) % len(self))
            if "skipped" not in item:
                for name in new:
                    log.warning("skipping unreadable image %s (%s); %d skipped so far", name, self.skipped[name],
                                len(self.skipped))
                return {**item, "skipped_before": passed}
            passed.append(item["skipped"])
            if item["skipped"] not in self.skipped:
                self.skipped[item["skipped"]] = item["error"]
                new.append(item["skipped"])
        first = "; ".join(f"{name}: {why}" for name, why in list(self.skipped.items())[:2])
        raise ValueError(f"none of the {len(self)} images of the data can be read (first: {first}); check the "
                         "data folder or shards (setup.data)")


def read_prompts(path: str | Path, caption_column: str | None = None) -> list[str]:
    """Prompts of a ``.txt`` file (one per non-empty line) or a ``.jsonl`` (a caption key per line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist (one prompt per line, or JSON lines)")
    left_out: dict[str, str] = {}
    if path.suffix == ".jsonl":
        rows = read_json_lines(path, left_out, warn=False)
        key = caption_column or next((k for k in CAPTION_KEYS if rows and k in rows[0][1]), "text")
        prompts = []
        for n, row in rows:
            if key in row:
                prompts.append(_first_caption(row[key]))
            else:
                left_out[f"{path}:{n}"] = f"no {key!r} key"
    else:
        prompts = [line.strip() for _, line in _text_lines(path, left_out, warn=False) if line.strip()]
    first = next(iter(left_out.items()), None)
    if not prompts:
        raise ValueError(f"{path} holds no prompts" + (f" ({len(left_out)} unreadable lines; first: "
                                                       f"{first[0]}: {first[1]})" if first else ""))
    if first:
        log.warning("%s: %d unreadable lines left out (first: %s: %s)", path, len(left_out), *first)
    return prompts


def _text_lines(path: Path, left_out: dict[str, str], warn: bool = True) -> list[tuple[int, str]]:
    """``(line number, text)`` of a file's UTF-8 lines; a line that is not UTF-8 is left out (``left_out``),
    with a warning if ``warn``."""
    lines = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            lines.append((n, raw.decode("utf-8")))
        except UnicodeDecodeError as err:
            left_out[f"{path}:{n}"] = f"not UTF-8 ({err.reason})"
            if warn:
                log.warning("%s:%d: not UTF-8 (%s); left out", path, n, err.reason)
    return lines


def read_json_lines(path: Path, left_out: dict[str, str], warn: bool = True) -> list[tuple[int, dict]]:
    """``(line number, object)`` of a JSON-lines file; a line that is not a JSON object is left out, named
    ``file:line`` in ``left_out`` (and in a warning if ``warn``)."""
    rows = []
    for n, line in _text_lines(path, left_out, warn):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            row, why = None, f"not valid JSON ({err})"
        else:
            why = None if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"
        if why is None:
            rows.append((n, row))
        else:
            left_out[f"{path}:{n}"] = why
            if warn:
                log.warning("%s:%d: %s; left out", path, n, why)
    return rows


class PromptDataset(Dataset):
    """Prompt-only items ``{"index", "caption"}`` (the same interface as :class:`ImageCaptionDataset`)."""

    def __init__(self, prompts: Sequence[str], resolution: int):
        self.prompts, self.resolution = list(prompts), resolution
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def load(self, i: int) -> dict:
        return {"index": i, "caption": self.prompts[i]}

    __getitem__ = load
