"""Image grids: teacher vs student samples of the same prompt and noise, side by side.

One row per prompt, one labelled column per method (teacher first), the prompt under the row.
Small images are enlarged (nearest neighbour) and large ones reduced so cells are 128-512 px.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .fid import to_uint8_rgb

PAD = 6
TEXT = 16  # font size, px


def _cell(image: Tensor, size: int) -> Image.Image:
    img = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.NEAREST if size > img.width else Image.Resampling.LANCZOS)


def prompt_row(images: Sequence[Tensor], labels: Sequence[str], caption: str | None = None) -> Image.Image:
    """One labelled row: ``images`` (uint8 3 x H x W each) under ``labels``, ``caption`` below."""
    size = min(max(images[0].shape[-1], 128), 512)
    font = ImageFont.load_default(size=TEXT)
    width = len(images) * (size + PAD) + PAD
    lines = textwrap.wrap(caption or "", width=max(20, width // (TEXT // 2 + 1)))[:3]
    height = PAD + TEXT + PAD + size + PAD + len(lines) * (TEXT + 2) + (PAD if lines else 0)
    row = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(row)
    for j, (image, label) in enumerate(zip(images, labels)):
        x = PAD + j * (size + PAD)
        draw.text((x, PAD), label, fill="black", font=font)
        row.paste(_cell(image, size), (x, 2 * PAD + TEXT))
    for k, line in enumerate(lines):
        draw.text((PAD, 3 * PAD + TEXT + size + k * (TEXT + 2)), line, fill="black", font=font)
    return row


def stack_rows(rows: Sequence[Image.Image]) -> Image.Image:
    """Rows one under another (left-aligned)."""
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height
    return out


def save_grids(samples: Mapping[str, Tensor], captions: Sequence[str], out_dir: str | Path) -> list[Path]:
    """Write ``prompt_<i>.png`` per prompt and ``all.png`` (every row) into ``out_dir``.

    samples: method name -> N x C x H x W images (uint8 or float in [0, 1]), same prompts and
        noise in every method; captions: the N prompts.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(samples)
    images = {name: to_uint8_rgb(samples[name]) for name in names}
    rows, paths = [], []
    for i, caption in enumerate(captions):
        rows.append(prompt_row([images[name][i] for name in names], names, f"{i}: {caption}"))
        paths.append(out_dir / f"prompt_{i:03d}.png")
        rows[-1].save(paths[-1])
    if rows:
        paths.append(out_dir / "all.png")
        stack_rows(rows).save(paths[-1])
    return paths
