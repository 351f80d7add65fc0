"""Prompts for text-to-image evaluation: COCO caption protocols and plain prompt files.

COCO inputs are a captions annotation JSON (COCO 2014 / 2017 format: ``images`` with ``id`` and
``file_name``, ``annotations`` with ``image_id`` and ``caption``) and its image folder.

Protocols (one caption per image, both chosen from the seed):

- ``coco2014-30k``: 30,000 random images of val2014 (40,504 images), one random caption each.
- ``coco2017-5k``: all 5,000 images of val2017, one random caption each.
- ``custom``: ``num`` random images (default: all) of any annotation file.

An image-caption folder with a ``metadata.jsonl`` (:func:`load_image_folder`, the training data's
format) is a prompt set too: its captions in file order, its images the FID reference, and an
optional integer ``label`` column, the class each caption names (prompt accuracy of a classifier).

"Random" is a hash of ``(seed, image id)``, so a selection never depends on the Python or
NumPy version. ``num`` with a named protocol takes the first ``num`` of its selection (a quick
look, not the paper's protocol; the result records it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

# protocol: (number of images, the annotation file it is defined on); custom: any file, all images
PROTOCOLS = {"coco2014-30k": (30_000, "captions_val2014.json"), "coco2017-5k": (5_000, "captions_val2017.json"),
             "custom": (None, None)}


@dataclass(frozen=True)
class PromptSet:
    """Prompts to generate from, with the real images they describe (None for a plain prompt file)."""

    prompts: list[str]
    image_paths: list[Path] | None
    source: str
    labels: list[int] | None = None
    """The class each prompt names (an image folder's ``label`` column), for a classifier's accuracy."""

    def __len__(self) -> int:
        return len(self.prompts)

    def to_json(self) -> list[dict]:
        """One record per prompt (and image), in generation order."""
        paths = self.image_paths or [None] * len(self.prompts)
        labels = self.labels or [None] * len(self.prompts)
        return [{"index": i, "prompt": p, "image": None if f is None else str(f),
                 **({} if c is None else {"label": c})}
                for i, (p, f, c) in enumerate(zip(self.prompts, paths, labels))]


def _hash(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def read_coco_captions(annotations: str | Path) -> dict[int, tuple[str, list[str]]]:
    """``{image_id: (file_name, [captions...])}`` of a COCO captions file (images without a caption dropped)."""
    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(
            f"COCO annotation file {path} not found: pass the captions JSON (e.g. annotations/captions_val2014.json "
            "from annotations_trainval2014.zip) with --coco-annotations")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = {int(img["id"]): str(img["file_name"]) for img in data["images"]}
        captions: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            captions.setdefault(int(ann["image_id"]), []).append(" ".join(str(ann["caption"]).split()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read COCO annotation file {path}: {err}") from err
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a COCO captions file (needs images[id, file_name] and "
                         f"annotations[image_id, caption]): {err!r}") from err
    unknown = sorted(set(captions) - set(files))
    if unknown:
        raise ValueError(f"{path}: captions refer to image id {unknown[0]} which is not in its images list")
    if not captions:
        raise ValueError(f"{path} holds no captions")
    return {i: (files[i], captions[i]) for i in sorted(captions)}


def load_coco(annotations: str | Path, images_dir: str | Path, protocol: str = "custom", num: int | None = None,
              seed: int = 0) -> PromptSet:
    """Prompts and reference images of a COCO protocol (see the module docstring)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown COCO protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    if num is not None and num < 1:
        raise ValueError(f"--num must be positive, got {num}")
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"COCO image folder {images_dir} not found: pass the folder of the annotation "
                                "file's images (e.g. val2014/) with --coco-images")
    table = read_coco_captions(annotations)
    count, expected_file = PROTOCOLS[protocol]
    count = count or len(table)
    if len(table) < count:
        raise ValueError(f"{annotations} has captions for {len(table)} images; the {protocol} protocol needs "
                         f"{count}: pass {expected_file} (or --protocol custom)")
    chosen = sorted(table, key=lambda i: (_hash(seed, i), i))[:count]
    chosen = chosen[:num] if num is not None else chosen
    prompts, paths = [], []
    for image_id in chosen:
        file_name, caps = table[image_id]
        prompts.append(caps[_hash(seed, image_id, "caption") % len(caps)])
        paths.append(images_dir / file_name)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(paths)} selected COCO images are missing from "
                                f"{images_dir}, e.g. {missing[0]}: is it the folder that matches {annotations}?")
    subset = "" if num is None or protocol == "custom" else f", first {len(chosen)} (subset, not the full protocol)"
    return PromptSet(prompts, paths, f"COCO {protocol} from {Path(annotations).name}, seed {seed}{subset}")


def load_prompt_file(path: str | Path, num: int | None = None) -> PromptSet:
    """A UTF-8 text file with one prompt per line (blank lines skipped); ``num`` keeps the first ``num``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found: pass a text file with one prompt per line (--prompts)")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read prompt file {path}: {err}") from err
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (one prompt per line)")
    return PromptSet(prompts[:num], None, f"prompts from {path.name}")



def load_image_folder(folder: str | Path, num: int | None = None) -> PromptSet:
    """Captions, images and (where every row has one) ``label`` of an image folder's ``metadata.jsonl``,
    in file order; ``num`` keeps ``num`` rows spread evenly over the file (row ``i * n // num``), so a
    folder sorted by class (the built-in ``heldout/``) gives every class its share."""
    from .captions import read_json_lines

    folder = Path(folder)
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(f"{folder} has no metadata.jsonl: an evaluation folder needs one line "
                                '{"file_name": ..., "text": ...} per image (optionally "label")')
    left_out: dict[str, str] = {}
    numbered = read_json_lines(metadata, left_out, warn=False)
    if left_out:
        where, why = next(iter(left_out.items()))
        raise ValueError(f"{where}: {why}; fix or remove the line")
    bad = next((n for n, row in numbered if "file_name" not in row or "text" not in row), None)
    if bad is not None:
        raise ValueError(f"{metadata}:{bad}: each line needs 'file_name' and 'text'")
    rows = [row for _, row in numbered]
    if num is not None and num < len(rows):  # spread over the folder: a folder sorted by class stays balanced
        rows = [rows[i * len(rows) // num] for i in range(num)]
    if not rows:
        raise ValueError(f"{metadata} holds no images")
    paths = [folder / str(row["file_name"]) for row in rows]
    missing = next((p for p in paths if not p.is_file()), None)
    if missing is not None:
        raise FileNotFoundError(f"{missing} (named in {metadata}) does not exist")
    labels = None
    if all("label" in row for row in rows):
        if not all(isinstance(row["label"], int) and not isinstance(row["label"], bool) for row in rows):
            raise ValueError(f"{metadata}: every 'label' must be an integer class")
        labels = [row["label"] for row in rows]
    return PromptSet([str(row["text"]) for row in rows], paths, f"image folder {folder.name}", labels)
