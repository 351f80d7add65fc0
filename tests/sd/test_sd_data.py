"""Image-caption sources, preprocessing, skipped images, and the latent cache."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from proreflow.sd.captions import (
    FolderSource,
    ImageCaptionDataset,
    TarShardSource,
    open_source,
    read_prompts,
    resize_and_crop,
)

from .tiny import CAPTIONS, write_image_folder


def test_folder_with_txt_captions_skips_the_corrupt_image(image_dir, caplog):
    source = open_source(image_dir)
    assert isinstance(source, FolderSource) and len(source) == len(CAPTIONS) + 1
    data = ImageCaptionDataset(source, resolution=16)
    broken = [i for i in range(len(source)) if source.record(i).name.endswith("broken.jpg")][0]
    with caplog.at_level(logging.WARNING):
        item = data[broken]
    assert item["index"] == (broken + 1) % len(source)  # the next readable image stands in
    assert list(data.skipped) == [str(image_dir / "broken.jpg")]
    assert "skipping unreadable image" in caplog.text and "broken.jpg" in caplog.text
    assert item["pixels"].shape == (3, 16, 16) and -1 <= item["pixels"].min() <= item["pixels"].max() <= 1


def test_metadata_jsonl_folder(tmp_path):
    folder = write_image_folder(tmp_path / "meta", corrupt=False, metadata=True)
    source = open_source(folder)
    assert [source.record(i).caption for i in range(len(source))] == CAPTIONS


def test_resize_and_crop_like_the_training_scripts():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))  # h = 40, w = 56
    pixels, original, crop = resize_and_crop(image, 16)
    assert original == (40, 56) and crop == (0, 3)  # shorter side -> 16, width int(16 * 56 / 40) = 22
    want = np.asarray(image.resize((22, 16), Image.Resampling.BILINEAR).crop((3, 0, 19, 16)), dtype=np.float32)
    torch.testing.assert_close(pixels, torch.from_numpy(want).permute(2, 0, 1) / 127.5 - 1)
    flipped, _, crop_flipped = resize_and_crop(image, 16, flip=True)
    assert crop_flipped == (0, 22 - 3 - 16)
    torch.testing.assert_close(flipped, pixels.flip(-1))
    _, _, random_crop = resize_and_crop(image, 16, center_crop=False, generator=torch.Generator().manual_seed(0))
    assert random_crop[0] == 0 and 0 <= random_crop[1] <= 6


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path):
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:05d}.tar", "w") as tar:
            for k in range(3):
                key = f"{s:02d}{k:03d}"
                _add(tar, f"{key}.png", _png(10 * s + k) if (s, k) != (1, 2) else b"not an image")
                _add(tar, f"{key}.txt", f"caption {s} {k}".encode())
                _add(tar, f"{key}.json", b"{}")
            _add(tar, "orphan.jpg", _png(99))  # no caption: left out
    source = open_source(str(tmp_path / "shard-{00000..00001}.tar"))
    assert isinstance(source, TarShardSource) and len(source) == 6
    assert [source.record(i).caption for i in (4, 0)] == ["caption 1 1", "caption 0 0"]  # random access
    data = ImageCaptionDataset(source, 16)
    skipped = data.load(5)
    assert skipped["skipped"] == f"{tmp_path / 'shard-00001.tar'}:01002"
    assert skipped["error"].startswith("UnidentifiedImageError")
    assert data[5]["caption"] == "caption 0 0" and len(data.skipped) == 1
    assert len(open_source(tmp_path)) == 6  # a folder of shards


def test_local_datasets_folder(image_dir, tmp_path):
    import datasets

    files = sorted(p for p in image_dir.glob("*") if p.suffix in (".png", ".jpg"))
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in files],
                                     "caption": [p.with_suffix(".txt").read_text().strip() for p in files]})
    ds.cast_column("image", datasets.Image()).save_to_disk(tmp_path / "ds")
    source = open_source(tmp_path / "ds")
    assert len(source) == len(files) and source.record(0).caption == files[0].with_suffix(".txt").read_text().strip()
    data = ImageCaptionDataset(source, 16)
    assert [data.load(i).get("skipped") is not None for i in range(len(files))] == [p.name == "broken.jpg"
                                                                                    for p in files]


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    rows = [{"prompt": "a cat"}, {"prompt": ["x", "y"]}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    assert read_prompts(tmp_path / "p.jsonl") == ["a cat", "x"]
    with pytest.raises(FileNotFoundError, match="one prompt per line"):
        read_prompts(tmp_path / "none.txt")


def test_latent_cache_equals_encoding_on_the_fly(sd15_dir, image_dir, tmp_path):
    from proreflow.sd.setup import build_sd_setup

    common = {"teacher": str(sd15_dir), "data": str(image_dir), "device": "cpu", "seed": 3}
    cached = build_sd_setup(cache_dir=str(tmp_path / "cache"), **common)
    live = build_sd_setup(**common)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["count"] == len(CAPTIONS) and list(manifest["skipped"]) == [str(image_dir / "broken.jpg")]
    assert list(cached.info["skipped_images"]) == [str(image_dir / "broken.jpg")]
    assert len(cached.dataset) == len(CAPTIONS)
    # the folder sorts broken.jpg first: cache row i holds image i + 1; live item 0 is image 1's stand-in
    for row, index in [(0, 0), (0, 1), (4, 5)]:
        (x_cache, c_cache), (x_live, c_live) = cached.dataset[row], live.dataset[index][:2]
        assert x_cache.dtype == torch.float32 and x_cache.shape == (4, 8, 8)
        torch.testing.assert_close(x_cache, x_live, rtol=2e-3, atol=2e-3)  # float16 storage
        torch.testing.assert_close(c_cache["encoder_hidden_states"], c_live["encoder_hidden_states"],
                                   rtol=2e-3, atol=2e-3)
    stamp = (tmp_path / "cache" / "shard-00000.safetensors").stat().st_mtime_ns
    build_sd_setup(cache_dir=str(tmp_path / "cache"), **common)  # reused, not rebuilt
    assert (tmp_path / "cache" / "shard-00000.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="resolution: cache 16, now 32"):
        build_sd_setup(cache_dir=str(tmp_path / "cache"), resolution=32, **common)


def test_a_stale_latent_cache_is_rebuilt(sd15_dir, tmp_path, caplog):
    """The cache is keyed on its files (count, sizes, mtimes) and encoders (classes, dtype): adding an
    image or changing encoder_dtype rebuilds it, saying why; the same inputs reuse it."""
    from proreflow.sd.setup import build_sd_setup

    data = write_image_folder(tmp_path / "data", corrupt=False)
    cache = tmp_path / "data" / "cache"  # inside the data folder: its own files are not data
    common = {"teacher": str(sd15_dir), "data": str(data), "device": "cpu", "cache_dir": str(cache)}

    def built() -> dict:
        return json.loads((cache / "manifest.json").read_text())

    build_sd_setup(**common)
    first = built()
    assert first["count"] == len(CAPTIONS) and first["settings"]["files"]["count"] == 2 * len(CAPTIONS)
    assert first["settings"]["encoder_dtype"] == "torch.float32"
    assert first["settings"]["encoder"] == "CLIPTextModel+AutoencoderKL"
    stamp = (cache / "shard-00000.safetensors").stat().st_mtime_ns
    build_sd_setup(**common)
    assert built() == first and (cache / "shard-00000.safetensors").stat().st_mtime_ns == stamp  # reused

    Image.new("RGB", (20, 24), (200, 10, 10)).save(data / "new.png")
    (data / "new.txt").write_text("a new red cat\n")
    with caplog.at_level(logging.WARNING, logger="proreflow.sd.latent_cache"):
        setup = build_sd_setup(**common)
    assert built()["count"] == len(CAPTIONS) + 1 and len(setup.dataset) == len(CAPTIONS) + 1
    assert any("is stale (files: cache {'count': 12" in r.message and "rebuilding" in r.message
               for r in caplog.records)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="proreflow.sd.latent_cache"):
        build_sd_setup(**common, encoder_dtype="bf16")
    assert built()["settings"]["encoder_dtype"] == "torch.bfloat16"
    assert any("encoder_dtype: cache 'torch.float32', now 'torch.bfloat16'" in r.message for r in caplog.records)
    stamp = (cache / "shard-00000.safetensors").stat().st_mtime_ns
    build_sd_setup(**common, encoder_dtype="bfloat16")  # the same dtype by another name: reused
    assert (cache / "shard-00000.safetensors").stat().st_mtime_ns == stamp


def test_bad_captions_and_metadata_lines_are_left_out_and_named(tmp_path, caplog):
    folder = tmp_path / "txt"
    folder.mkdir()
    for k in range(3):
        (folder / f"{k}.png").write_bytes(_png(k))
        (folder / f"{k}.txt").write_bytes(b"caption \xff\xfe bad" if k == 1 else f"caption {k}".encode())
    with caplog.at_level(logging.WARNING):
        source = FolderSource(folder)
    assert [source.record(i).caption for i in range(len(source))] == ["caption 0", "caption 2"]
    assert list(source.left_out) == [str(folder / "1.txt")] and "not UTF-8" in caplog.text

    meta = tmp_path / "meta"
    meta.mkdir()
    lines = [json.dumps({"file_name": "0.png", "text": "zero"}), "{not json", "[1, 2]",
             json.dumps({"text": "no file"}), b"\xff\xfe".decode("latin-1"), json.dumps({"file_name": "1.png",
                                                                                          "text": "one"})]
    (meta / "metadata.jsonl").write_bytes("\n".join(lines).replace("\u00ff\u00fe", "\udcff").encode(
        "utf-8", "surrogateescape"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        source = FolderSource(meta)
    assert [source.record(i).caption for i in range(len(source))] == ["zero", "one"]
    path = meta / "metadata.jsonl"
    assert sorted(source.left_out) == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    assert source.left_out[f"{path}:2"].startswith("not valid JSON") and source.left_out[f"{path}:5"].startswith(
        "not UTF-8")
    assert caplog.text.count("left out") == 1 and f"{meta}: 4 captions left out (first: {path}:" in caplog.text


def test_damaged_shards_are_skipped_and_counted(tmp_path, caplog):
    with tarfile.open(tmp_path / "good.tar", "w") as tar:
        for k in range(2):
            _add(tar, f"{k:03d}.png", _png(k))
            _add(tar, f"{k:03d}.txt", f"caption {k}".encode())
    data = (tmp_path / "good.tar").read_bytes()
    (tmp_path / "truncated.tar").write_bytes(data[:700])  # inside the first member's header / data
    (tmp_path / "garbage.tar").write_bytes(b"this is no tar file" * 50)
    with caplog.at_level(logging.WARNING):
        source = TarShardSource(tmp_path)
    assert len(source) == 2 and sorted(source.left_out) == [str(tmp_path / "garbage.tar"),
                                                              str(tmp_path / "truncated.tar")]
    assert "damaged shard" in caplog.text and "2 of 3 shards damaged" in caplog.text
    (tmp_path / "good.tar").unlink()
    with pytest.raises(ValueError, match=r"in 2 shard\(s\) \(2 damaged; first: .*garbage.tar: damaged shard"):
        TarShardSource(tmp_path)


def test_a_truncated_shard_keeps_the_samples_before_the_cut(tmp_path):
    """Cut inside the last sample's image: the samples written before it are read, the cut one is left out."""
    with tarfile.open(tmp_path / "full.tar", "w") as tar:
        for k in range(3):
            _add(tar, f"{k:03d}.txt", f"caption {k}".encode())
            _add(tar, f"{k:03d}.png", _png(k))
    data = (tmp_path / "full.tar").read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        last = [m for m in tar if m.name == "002.png"][0]
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "cut.tar").write_bytes(data[:last.offset_data + last.size // 2])
    source = TarShardSource(cut)
    assert [source.record(i).caption for i in range(len(source))] == ["caption 0", "caption 1"]
    whole = TarShardSource(tmp_path / "full.tar")
    for i in range(2):
        assert source.record(i).open().tobytes() == whole.record(i).open().tobytes()
    assert "2 complete samples before the damage kept" in source.left_out[str(cut / "cut.tar")]


def test_an_image_too_large_once_resized_is_skipped_before_decoding(tmp_path):
    """A valid 1 x 20000 px PNG at resolution 512 would be resized to 512 x 10,240,000 px (15.7 GB as floats)."""
    folder = tmp_path / "strip"
    folder.mkdir()
    Image.new("RGB", (1, 20000)).save(folder / "strip.png")
    (folder / "strip.txt").write_text("a strip")
    (folder / "ok.png").write_bytes(_png(1))
    (folder / "ok.txt").write_text("fine")
    data = ImageCaptionDataset(FolderSource(folder), 512)
    skipped = data.load(1)
    assert skipped["skipped"].endswith("strip.png") and "exceeds the limit of 67,108,864 px" in skipped["error"]
    assert data[1]["caption"] == "fine" and list(data.skipped) == [str(folder / "strip.png")]


def test_read_prompts_leaves_out_unreadable_lines(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"a cat\n\xff\xfe\na dog\n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_bytes(b'{"prompt": "a cat"}\n{oops\n{"prompt": "a dog"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a cat", "a dog"]
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\n")
    with pytest.raises(ValueError, match=r"holds no prompts \(1 unreadable lines; first: .*bad.txt:1: not UTF-8"):
        read_prompts(tmp_path / "bad.txt")


@pytest.mark.parametrize("caption", [None, 7, {"en": "a cat"}, [1, 2]])
def test_a_caption_that_is_not_text_is_left_out(tmp_path, caption, caplog):
    rows = [{"file_name": "0.png", "text": "zero"}, {"file_name": "1.png", "text": caption}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for k in range(2):
        (tmp_path / f"{k}.png").write_bytes(_png(k))
    with caplog.at_level(logging.WARNING):
        source = FolderSource(tmp_path)
    assert [source.record(i).caption for i in range(len(source))] == ["zero"]
    assert list(source.left_out) == [f"{tmp_path / 'metadata.jsonl'}:2"] and "1 captions left out" in caplog.text
    (tmp_path / "metadata.jsonl").write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match=r"holds no captioned images.*\(1 left out; first: .*metadata.jsonl:1: "):
        FolderSource(tmp_path)


def test_data_whose_every_image_is_unreadable_is_one_error_without_warnings(tmp_path, caplog):
    """Nothing to train on is bad input named in one error; the per-image warnings come only when some image
    is readable (then they say what the run passes over)."""
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{k}.png", "text": "x"}) + "\n"
                                                     for k in range(3)))
    for k in range(3):
        (tmp_path / f"{k}.png").write_bytes(b"not a png")
    data = ImageCaptionDataset(FolderSource(tmp_path), 16)
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match=r"none of the 3 images of the data can "
                                                                            r"be read \(first: .*0\.png: "):
        data[0]
    assert "skipping" not in caplog.text
    (tmp_path / "1.png").write_bytes(_png(1))
    with caplog.at_level(logging.WARNING):
        item = ImageCaptionDataset(FolderSource(tmp_path), 16)[2]
    assert item["index"] == 1 and item["skipped_before"] == [str(tmp_path / "2.png"), str(tmp_path / "0.png")]
    assert caplog.text.count("skipping unreadable image") == 2
