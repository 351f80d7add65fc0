"""COCO caption protocols and prompt files: seeded selections, one caption per image, clear errors."""

from __future__ import annotations

import json

import pytest

from proreflow.sd import coco
from proreflow.sd.coco import load_coco, load_prompt_file, read_coco_captions


def test_captions_grouped_per_image(make_coco):
    annotations, _ = make_coco(images=3, captions_per_image=2)
    table = read_coco_captions(annotations)
    assert list(table) == [1000, 1007, 1014]
    assert table[1007] == ("COCO_val_000000001007.jpg", ["a dog", "a red cat"])


def test_custom_protocol_is_seeded_one_caption_per_distinct_image(make_coco):
    annotations, folder = make_coco(images=6, captions_per_image=3)
    table = read_coco_captions(annotations)
    a = load_coco(annotations, folder, "custom", num=4, seed=0)
    assert len(a) == 4 and a.image_paths is not None
    assert len(set(a.image_paths)) == 4  # distinct images
    for prompt, path in zip(a.prompts, a.image_paths):  # each caption belongs to its image
        image_id = int(path.stem.split("_")[-1])
        assert path.parent == folder and prompt in table[image_id][1]
    assert load_coco(annotations, folder, "custom", num=4, seed=0) == a  # deterministic
    selections = {tuple(load_coco(annotations, folder, "custom", seed=s).image_paths) for s in range(5)}
    assert len(selections) > 1  # the seed matters
    everything = load_coco(annotations, folder, "custom", seed=0)
    assert sorted(everything.image_paths) == sorted(folder / name for name, _ in table.values())
    assert everything.image_paths[:4] == a.image_paths  # --num takes a prefix of the selection


def test_named_protocols_need_their_image_count(make_coco, monkeypatch):
    annotations, folder = make_coco(images=5)
    with pytest.raises(ValueError, match=r"5 images.*coco2017-5k protocol needs 5000.*captions_val2017.json"):
        load_coco(annotations, folder, "coco2017-5k")
    # the same rule with the count scaled down: all images, one caption each
    monkeypatch.setitem(coco.PROTOCOLS, "coco2017-5k", (5, "captions_val2017.json"))
    full = load_coco(annotations, folder, "coco2017-5k", seed=3)
    assert len(set(full.image_paths)) == 5 and "subset" not in full.source
    monkeypatch.setitem(coco.PROTOCOLS, "coco2014-30k", (3, "captions_val2014.json"))
    part = load_coco(annotations, folder, "coco2014-30k", seed=3)
    assert len(part) == 3 and len(set(part.image_paths)) == 3
    quick = load_coco(annotations, folder, "coco2014-30k", num=2, seed=3)
    assert quick.prompts == part.prompts[:2] and "subset" in quick.source
    with pytest.raises(ValueError, match="unknown COCO protocol"):
        load_coco(annotations, folder, "coco2015")


def test_annotation_errors_name_the_file(tmp_path, make_coco):
    missing = tmp_path / "captions_val2014.json"
    with pytest.raises(FileNotFoundError, match="captions_val2014.json.*--coco-annotations"):
        read_coco_captions(missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        read_coco_captions(broken)
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}))
    with pytest.raises(ValueError, match="instances.json is not a COCO captions file"):
        read_coco_captions(instances)
    orphan = tmp_path / "orphan.json"
    orphan.write_text(json.dumps({"images": [], "annotations": [{"image_id": 5, "caption": "x"}]}))
    with pytest.raises(ValueError, match="orphan.json.*image id 5"):
        read_coco_captions(orphan)


def test_image_errors_name_the_folder_and_file(make_coco, tmp_path):
    annotations, folder = make_coco(images=3)
    with pytest.raises(FileNotFoundError, match="nowhere.*--coco-images"):
        load_coco(annotations, tmp_path / "nowhere")
    (folder / "COCO_val_000000001007.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 of the 3.*COCO_val_000000001007.jpg"):
        load_coco(annotations, folder)


def test_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a dog on a mat  \nred\n")
    assert load_prompt_file(path).prompts == ["a cat", "a dog on a mat", "red"]
    assert load_prompt_file(path, num=2).prompts == ["a cat", "a dog on a mat"]
    assert load_prompt_file(path).image_paths is None
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompt_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt holds no prompts"):
        load_prompt_file(tmp_path / "empty.txt")
