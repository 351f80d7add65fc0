"""The built-in text-to-image teacher (mnist-t2i) and the whole Stable Diffusion path on a tiny version of it.

The tiny teacher is the real one (same component classes, tokenizer, data folders, code) trained for two
steps; the path is the one users run: ``proreflow train --config configs/mnist-t2i.yaml``, ``proreflow
export``, the export in a Python without proreflow, ``proreflow eval`` with the built-in classifier.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from proreflow.builtin.t2i import (
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    caption,
    caption_label,
    clip_tokenizer,
    load_or_train_t2i_teacher,
    to_grey28,
)
from proreflow.cli import main as cli
from proreflow.sd.captions import ImageCaptionDataset, open_source
from proreflow.sd.coco import load_image_folder
from proreflow.sd.export import export_pipeline
from proreflow.sd.pipeline import load_teacher
from proreflow.sd.t2i import ddim_sampler
from proreflow.training.recipes import load_config

from .test_sd_export import fresh_sample, max_diff, proreflow_sample

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = dict(vae_steps=2, steps=2, batch_size=4)


@pytest.fixture(scope="module")
def t2i_cache(tmp_path_factory):
    """One model cache for the module (the tiny teacher, the MNIST classifier), as $PROREFLOW_CACHE."""
    cache = tmp_path_factory.mktemp("t2i-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PROREFLOW_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def tiny_t2i(t2i_cache):
    """The mnist-t2i teacher trained for 2 steps, with its data folders, in a fresh cache."""
    return load_or_train_t2i_teacher(progress=False, **TINY)


def test_the_tokenizer_is_clips():
    """The real CLIP BPE vocabulary: CLIP's size and its ids (49406 / 49407 start / end, 320 'a', 518 'the')."""
    tok = clip_tokenizer(16)
    assert len(tok) == 49408
    ids = tok("the number 7, written by hand").input_ids
    assert ids[:2] == [49406, 518] and ids[-1] == 49407
    assert tok("a").input_ids == [49406, 320, 49407]
    assert tok.convert_ids_to_tokens(tok("a handwritten digit seven").input_ids)[1:-1] == [
        "a</w>", "handwritten</w>", "digit</w>", "seven</w>"]


def test_captions_name_their_digit_and_held_out_templates_are_new():
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)
    for digit in range(10):
        for template in (*TRAIN_TEMPLATES, *HELDOUT_TEMPLATES):
            assert caption_label(caption(digit, template)) == digit
    training = {caption(d, t) for d in range(10) for t in TRAIN_TEMPLATES}
    assert not training & {caption(d, t) for d in range(10) for t in HELDOUT_TEMPLATES}


def test_the_classifier_input_inverts_the_padding():
    from proreflow.builtin.images import load_mnist_images
    from proreflow.builtin.t2i import mnist_t2i_images

    padded, _ = mnist_t2i_images()
    original, _ = load_mnist_images()
    assert padded.shape[1:] == (3, 32, 32)
    torch.testing.assert_close(to_grey28((padded[:50] + 1) / 2), original[:50], atol=1e-6, rtol=0)


def test_data_folders_are_read_by_the_sd_loaders(tiny_t2i):
    """train/ (metadata.jsonl) and shards/ hold the same captioned images; heldout/ carries the labels."""
    folder = open_source(str(tiny_t2i.data["train"]))
    shards = open_source(str(tiny_t2i.data["shards"]))
    assert len(folder) == len(shards) == 4000
    for i in (0, 1, 2345, 3999):
        assert folder.record(i).caption == shards.record(i).caption
        a, b = folder.record(i).open(), shards.record(i).open()
        assert a.size == (32, 32) and list(a.getdata()) == list(b.getdata())
        assert caption_label(folder.record(i).caption) is not None
    item = ImageCaptionDataset(folder, 32)[0]
    assert item["caption"] == folder.record(0).caption and item["pixels"].shape == (3, 32, 32)
    held = load_image_folder(tiny_t2i.data["heldout"])
    assert len(held) == 1000 and held.labels is not None
    assert all(caption_label(p) == label for p, label in zip(held.prompts, held.labels))
    assert {p for p in held.prompts} <= {caption(d, t) for d in range(10) for t in HELDOUT_TEMPLATES}
    assert sorted(held.labels.count(d) for d in range(10)) == [100] * 10
    assert held.labels == sorted(held.labels)  # written in MNIST's order, sorted by class
    part = load_image_folder(tiny_t2i.data["heldout"], num=50)  # a subset spreads over the file: every class
    assert [part.labels.count(d) for d in range(10)] == [5] * 10 and part.prompts[0] == held.prompts[0]


def test_the_teacher_folder_is_a_stock_pipeline(tiny_t2i):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_t2i.pipeline)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel" and len(pipe.tokenizer) == 49408
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.unet.config.addition_embed_type == "text"  # the text pooled into the time embedding too
    assert pipe.vae.config.scaling_factor == pytest.approx(tiny_t2i.stats["scaling_factor"])
    # a cached teacher is reused, not retrained
    again = load_or_train_t2i_teacher(progress=False, **TINY)
    assert not again.trained and again.path == tiny_t2i.path


def test_text_in_the_time_embedding_is_a_setting_and_settings_are_checked():
    from proreflow.builtin.t2i import build_components, t2i_config

    assert getattr(build_components(t2i_config(text_time_embedding=False))["unet"], "add_embedding", None) is None
    assert type(build_components(t2i_config())["unet"].add_embedding).__name__ == "TextTimeEmbedding"
    with pytest.raises(ValueError, match="text_time_embedding must be true or false"):
        t2i_config(text_time_embedding=1)
    with pytest.raises(ValueError, match="steps must be a finite number"):
        t2i_config(steps=float("nan"))


def test_the_config_is_sd15_at_cpu_size():
    """configs/mnist-t2i.yaml keeps every choice of sd15.yaml: the values that differ are the ones it marks [size]."""
    def flat(raw, prefix=""):
        out = {}
        for key, value in raw.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            elif key == "stages":
                for i, stage in enumerate(value):
                    out.update(flat(stage, f"{prefix}stages.{i}."))
            else:
                out[prefix + key] = value
        return out

    ours = flat(yaml.safe_load((CONFIGS / "mnist-t2i.yaml").read_text()))
    sd15 = flat(yaml.safe_load((CONFIGS / "sd15.yaml").read_text()))
    assert set(ours) == set(sd15)
    changed = {k for k in ours if ours[k] != sd15[k]} - {"name", "description", "setup.teacher"}
    lines = (CONFIGS / "mnist-t2i.yaml").read_text().splitlines()
    stage_lines = [line for line in lines if line.strip().startswith("- {windows:")]
    assert changed
    for key in changed:  # each changed value's line says [size]
        if key.startswith("stages."):
            line = stage_lines[int(key.split(".")[1])]
        else:
            line = next(x for x in lines if x.split("#")[0].strip().startswith(key.split(".")[-1] + ":"))
        assert "[size]" in line.split("#", 1)[1], f"{key}: {line!r}"
    recipe, setup = load_config(CONFIGS / "mnist-t2i.yaml", ["setup.teacher=x", "setup.data=y"])
    assert [s.windows for s in recipe.stages] == [8, 4, 2] and setup["name"] == "stable-diffusion"


def test_the_whole_path_as_users_run_it(tiny_t2i, tmp_path):
    """train (config, full student) -> export -> eval with the built-in classifier: every command succeeds and the
    evaluation has a teacher row, baselines and the student rows with FD and accuracy."""
    run, export, evaluation = tmp_path / "run", tmp_path / "export", tmp_path / "eval"
    overrides = [f"setup.teacher={tiny_t2i.pipeline}", f"setup.data={tiny_t2i.data['shards']}",
                 f"setup.cache_dir={tmp_path / 'latents'}", "setup.encoder_dtype=float32", "stages.*.steps=1",
                 "defaults.batch_size=4", "defaults.warmup_steps=0", "stages.*.solver_steps=1",
                 "max_train_samples=16"]
    assert cli(["train", "--config", str(CONFIGS / "mnist-t2i.yaml"), "--out", str(run), "--no-progress",
                *overrides]) == 0
    assert cli(["export", "--run", str(run), "--out", str(export)]) == 0
    assert json.loads((export / "proreflow.json").read_text())["guidance"] == 4.0
    assert cli(["eval", "--teacher", str(tiny_t2i.pipeline), "--student", str(export), "--images",
                str(tiny_t2i.data["heldout"]), "--num", "8", "--classifier", "mnist", "--no-fid", "--steps", "2,1",
                "--teacher-steps", "4", "--teacher-baselines", "2", "--dpm-solver-steps", "2", "--device", "cpu",
                "--out", str(evaluation), "--batch-size", "4", "--workers", "0"]) == 0
    rows = {r["name"]: r for r in json.loads((evaluation / "results.json").read_text())["results"]}
    assert set(rows) == {"teacher DDIM-4", "teacher DDIM-2", "teacher DPM-Solver++ 2", "student 2-step",
                         "student 1-step"}
    for row in rows.values():
        assert row["fd"] > 0 and 0 <= row["accuracy"] <= 1 and row["fid"] is None and row["images"] == 8
    assert cli(["sample", "--model", str(export), "--prompt", "a handwritten digit seven", "--steps", "1",
                "--device", "cpu", "--out", str(tmp_path / "samples")]) == 0
    from PIL import Image

    drawn = sorted((tmp_path / "samples").glob("*.png"))
    assert len(drawn) == 1 and Image.open(drawn[0]).size == (32, 32)

    # a LoRA student of the same config: trained, exported as LoRA weights, sampled on the teacher's pipeline
    lora_run, lora = tmp_path / "lora-run", tmp_path / "lora"
    assert cli(["train", "--config", str(CONFIGS / "mnist-t2i.yaml"), "--out", str(lora_run), "--no-progress",
                *overrides, "setup.lora_rank=4"]) == 0
    assert cli(["export", "--run", str(lora_run), "--out", str(lora), "--lora"]) == 0
    assert cli(["sample", "--model", str(tiny_t2i.pipeline), "--lora", str(lora), "--prompt", "7", "--steps", "2",
                "--device", "cpu", "--out", str(tmp_path / "lora-samples")]) == 0
    assert len(list((tmp_path / "lora-samples").glob("*.png"))) == 1


def test_a_student_equal_to_the_teacher_exports_the_teachers_ddim(tiny_t2i, tmp_path):
    """True answer through the exported pipeline, in a Python without proreflow: the teacher's UNet exported
    as a 2-window student draws the teacher's own DDIM-2 image (diffusers' trailing DDIMScheduler on the
    teacher's pipeline) and ``proreflow.sample``'s, up to float rounding."""
    teacher = load_teacher(tiny_t2i.pipeline)
    export_pipeline(teacher.unet, teacher, tmp_path / "export", num_windows=2, guidance=2.0)
    noise = torch.randn(2, *teacher.latent_shape(32), generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "a dog"]
    latents, images, _ = fresh_sample(tmp_path, "StableDiffusionPipeline", tmp_path / "export", noise, 2,
                                      prompts=prompts, guidance=2.0)
    ddim = ddim_sampler(teacher.pipe, 2, 2.0).generate(noise, prompts)
    assert max_diff(images, ddim.permute(0, 2, 3, 1)) < 2e-6
    want_latents, want_images = proreflow_sample(teacher, teacher.unet, noise, 2)
    assert max_diff(latents, want_latents) < 1e-4 and max_diff(images, want_images) < 2e-6


def test_demo_runs_the_path_and_writes_its_report(tiny_t2i, tmp_path, monkeypatch):
    """``proreflow demo --data mnist-t2i`` (the tiny teacher in place of the cached one): the run, the export,
    the evaluation with every row of the issue's table, grids per held-out template, the diffusers lines."""
    from proreflow.commands import demo_t2i

    monkeypatch.setattr(demo_t2i, "load_or_train_t2i_teacher", lambda **kwargs: tiny_t2i)
    out = tmp_path / "demo"
    assert cli(["demo", "--data", "mnist-t2i", "--out", str(out), "--steps", "3", "--samples", "4",
                "--no-progress", "--threads", "1"]) == 0
    results = json.loads((out / "results.json").read_text())["mnist-t2i"]
    names = [r["name"] for r in results["results"]]
    assert names == ["teacher DDIM-32", "teacher DDIM-8", "teacher DDIM-4", "teacher DDIM-2", "teacher DDIM-1",
                     "teacher DPM-Solver++ 4", "student 4-step", "student 2-step", "student 1-step"]
    assert all(r["accuracy"] is not None and r["fd"] is not None for r in results["results"])
    report = (out / "report.md").read_text()
    assert "## mnist-t2i" in report and "StableDiffusionPipeline.from_pretrained" in report
    for k in range(len(HELDOUT_TEMPLATES)):
        assert (out / "mnist-t2i" / f"grid_template_{k}.png").is_file()
    assert (out / "mnist-t2i" / "export" / "model_index.json").is_file()


def test_teacher_eval_scores_ddim_on_held_out_captions(tiny_t2i):
    """``proreflow teacher --data mnist-t2i --eval``'s evaluation: DDIM rows on the held-out captions, the first
    one the reference of the others."""
    from proreflow.commands.teacher import evaluate_t2i_teacher

    rows = {r.name: r for r in evaluate_t2i_teacher(tiny_t2i, [4, 2], 2.0, 20, progress=False)}
    assert list(rows) == ["teacher DDIM-4", "teacher DDIM-2"]
    assert all(r.images == 20 and 0 <= r.accuracy <= 1 and r.fd > 0 for r in rows.values())
    assert rows["teacher DDIM-2"].rmse_to_teacher > 0
