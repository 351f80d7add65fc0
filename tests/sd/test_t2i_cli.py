"""``proreflow eval`` end to end on tiny offline models, and its errors."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from proreflow.cli import main


@pytest.fixture
def base_args(teacher_dir, student_dir, feature_file, tmp_path):
    return ["eval", "--teacher", str(teacher_dir), "--student", str(student_dir), "--inception", str(feature_file),
            "--steps", "1,2,4", "--teacher-steps", "4", "--guidance", "3", "--batch-size", "3", "--workers", "0",
            "--fid-cache", str(tmp_path / "cache"), "--grid-prompts", "2"]


def test_eval_on_coco_writes_results_tables_and_grids(base_args, make_coco, clip_dir, tmp_path, capsys):
    annotations, images = make_coco(images=6)
    out = tmp_path / "out"
    args = [*base_args, "--coco-annotations", str(annotations), "--coco-images", str(images), "--protocol", "custom",
            "--num", "5", "--clip-model", str(clip_dir), "--out", str(out)]
    assert main(args) == 0
    payload = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in payload["results"]}
    assert list(rows) == ["teacher DDIM-4", "student 1-step", "student 2-step", "student 4-step"]
    for name in ("teacher DDIM-4", "student 1-step", "student 2-step", "student 4-step"):
        assert rows[name]["images"] == 5 and rows[name]["fid"] > 0 and 0 <= rows[name]["clip_score"] <= 100
    for name in ("student 2-step", "student 4-step"):
        assert rows[name]["fid_to_teacher"] > 0 and rows[name]["rmse_to_teacher"] > 0
    settings = payload["settings"]
    assert settings["student_scheduler"] == "ProReflowScheduler, 2 windows" and settings["count"] == 5
    assert settings["teacher_guidance"] == 3 and settings["student_guidance"] == 3  # --guidance: shared
    assert settings["teacher_scheduler"] == ("DDIMScheduler(timestep_spacing='trailing', set_alpha_to_one=False, "
                                             "clip_sample=False), 4 steps")
    assert settings["clip_model"] == str(clip_dir) and settings["fid_network"] == base_args[6]
    prompts = json.loads((out / "prompts.json").read_text())
    assert len(prompts) == 5 and all(p["image"].startswith(str(images)) for p in prompts)
    table = (out / "results.md").read_text()
    assert "| student 4-step | 4 |" in table and "| student 1-step | 1 |" in table and "skipped" not in table
    assert table in capsys.readouterr().out
    grids = sorted(p.name for p in (out / "grids").iterdir())
    assert grids == ["all.png", "prompt_000.png", "prompt_001.png"]
    assert Image.open(out / "grids" / "prompt_000.png").width >= 3 * 128  # teacher + two students
    # the reference statistics were cached: a second run reuses them and gives the same FIDs
    cached = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(cached) == 1 and json.loads(cached[0].with_suffix(".json").read_text())["count"] == 5
    assert main([*args[:-1], str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    first, second = ([r["fid"] for r in run["results"]] for run in (payload, again))
    assert [f is None for f in second] == [f is None for f in first]  # the same rows skipped
    assert [f for f in second if f is not None] == pytest.approx([f for f in first if f is not None], rel=1e-6)
    assert list((tmp_path / "cache").glob("*.safetensors")) == cached


def test_eval_on_a_prompt_file_without_clip_in_bf16(base_args, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\nred\n")
    out = tmp_path / "out"
    # bfloat16 networks beside float32 VAEs (as load_teacher keeps them)
    assert main([*base_args, "--prompts", str(prompts), "--steps", "2", "--dtype", "bfloat16", "--out", str(out)]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["settings"]["dtype"] == "torch.bfloat16"
    assert [r["fid"] for r in payload["results"]] == [None, None]  # no real images
    assert payload["results"][1]["fid_to_teacher"] > 0 and payload["results"][1]["clip_score"] is None
    assert any("CLIP score not computed" in n for n in payload["notes"])
    err = capsys.readouterr().err
    assert "CLIP score not computed" in err
    bars = {part.split(":")[0] for part in err.replace("\r", "\n").splitlines() if "%|" in part}
    assert bars <= {"evaluate", "Loading pipeline components...", "Loading weights"}, bars  # no sampler bar


def test_a_student_of_another_teacher_is_named_in_one_warning(base_args, student_dir, teacher_dir, tmp_path,
                                                                capsys):
    import shutil

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    args = [*base_args, "--prompts", str(prompts), "--steps", "2"]
    assert main([*args, "--out", str(tmp_path / "own")]) == 0
    assert "distilled from" not in capsys.readouterr().err
    own = json.loads((tmp_path / "own" / "results.json").read_text())["settings"]
    assert own["student_distilled_from"] == str(teacher_dir)

    other = tmp_path / "other-student"
    shutil.copytree(student_dir, other)
    info = json.loads((other / "proreflow.json").read_text())
    (other / "proreflow.json").write_text(json.dumps({**info, "teacher": "someone/another-teacher"}))
    args[args.index("--student") + 1] = str(other)
    assert main([*args, "--out", str(tmp_path / "other")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "distilled from" in line]
    assert warnings == [f"proreflow eval: warning: the student was distilled from someone/another-teacher, not from "
                        f"--teacher {teacher_dir}: its rows compare it with another model"]
    settings = json.loads((tmp_path / "other" / "results.json").read_text())["settings"]
    assert settings["student_distilled_from"] == "someone/another-teacher"


@pytest.mark.parametrize("change, named", [
    (["--teacher", "/nowhere/teacher"], "/nowhere/teacher"),
    (["--student", "/nowhere/student"], "/nowhere/student"),
    (["--inception", "/nowhere/inception.pt"], "/nowhere/inception.pt"),
    (["--coco-annotations", "/nowhere/captions_val2014.json"], "/nowhere/captions_val2014.json"),
    (["--clip-model", "/nowhere/clip"], "/nowhere/clip"),
])
def test_missing_inputs_are_named(base_args, make_coco, tmp_path, capsys, change, named):
    annotations, images = make_coco(images=3)
    args = [*base_args, "--coco-annotations", str(annotations), "--coco-images", str(images),
            "--out", str(tmp_path / "out")]
    if change[0] in args:
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += change
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("proreflow eval: error:") and named in err
    assert not (tmp_path / "out").exists()


def test_coco_annotations_need_their_images(base_args, make_coco, tmp_path, capsys):
    annotations, _ = make_coco(images=3)
    assert main([*base_args, "--coco-annotations", str(annotations), "--out", str(tmp_path / "o")]) == 2
    assert "--coco-annotations needs --coco-images" in capsys.readouterr().err


@pytest.mark.parametrize("given, info, want", [
    ({}, {"guidance": 2.0}, (2.0, 2.0)),  # cfg_sync export: both at its guidance
    ({}, {"guidance": 1.0, "teacher_guidance": 4.0}, (4.0, 1.0)),  # baked: the teacher it reproduces
    ({}, {}, (7.5, 7.5)),
    ({"guidance": 3.0}, {"guidance": 1.0, "teacher_guidance": 4.0}, (3.0, 3.0)),
    ({"guidance": 3.0, "teacher_guidance": 5.0}, {}, (5.0, 3.0)),
    ({"student_guidance": 1.5}, {"guidance": 2.0}, (2.0, 1.5)),
])
def test_teacher_and_student_share_the_guidance_unless_told(given, info, want):
    import argparse

    from proreflow.commands.eval import guidances

    args = argparse.Namespace(**{"guidance": None, "teacher_guidance": None, "student_guidance": None, **given})
    assert guidances(args, info) == want


def test_teacher_and_student_pipelines_load_without_deprecation_warnings(teacher_dir, student_dir):
    """diffusers >= 0.40 takes ``dtype`` (``torch_dtype`` warns on every load): the loaders use it."""
    import warnings

    import torch

    from proreflow.sd.export import load_student_pipeline
    from proreflow.sd.pipeline import load_teacher

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        load_teacher(teacher_dir)
        load_student_pipeline(student_dir, dtype=torch.float32)


class _FakeJudge:
    name, classes = "fake classifier", 10

    def __init__(self, cache_dir=None):
        pass

    def set_reference(self, images):
        return self


@pytest.mark.parametrize("labels, error", [([3, 12], "--images: label 12 is not a class of the fake classifier "
                                                     "(0 to 9)"), (None, None)])
def test_image_folder_labels_are_checked_against_the_classifier(tmp_path, monkeypatch, capsys, labels, error):
    import argparse

    import proreflow.builtin.t2i as t2i
    from proreflow.commands.eval import _judge
    from proreflow.sd.coco import PromptSet

    monkeypatch.setattr(t2i, "JUDGES", {"mnist": _FakeJudge})
    monkeypatch.setattr("proreflow.sd.fid.load_reference_image", lambda path, resolution: __import__("torch").zeros(3))
    prompts = PromptSet(["a", "b"], [tmp_path / "0.png", tmp_path / "1.png"], "image folder x", labels)
    args = argparse.Namespace(classifier="mnist", cache_dir=None, resolution=None)
    if error:
        with pytest.raises(ValueError, match=re.escape(error)):
            _judge(args, prompts)
    else:
        assert _judge(args, prompts) is not None
        assert "image folder x has no 'label' column: the classifier gives FD, not accuracy" in capsys.readouterr().err
