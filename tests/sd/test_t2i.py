"""The evaluation runner: same noise per prompt for every method, fidelity, FID, CLIP, reports."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from torch import nn

from proreflow import Denoiser, TimeWindows, VPSchedule, sample
from proreflow.sd.clip_score import NO_CLIP_MESSAGE, ClipScorer
from proreflow.sd.export import load_student_pipeline
from proreflow.sd.fid import FID, to_uint8_rgb
from proreflow.sd.pipeline import load_teacher
from proreflow.sd.t2i import (
    PSNR_CAP,
    PromptSampler,
    ddim_sampler,
    denoiser_sampler,
    evaluate,
    pipeline_sampler,
    prompt_noise,
    psnr,
    write_report,
)


def test_prompt_noise_depends_only_on_seed_and_index():
    whole = prompt_noise(7, range(6), (2, 3, 3))
    assert whole.shape == (6, 2, 3, 3) and whole.dtype == torch.float32
    pieces = torch.cat([prompt_noise(7, [0, 1, 2, 3], (2, 3, 3)), prompt_noise(7, [4, 5], (2, 3, 3))])
    assert torch.equal(pieces, whole)
    assert torch.equal(prompt_noise(7, [5, 2], (2, 3, 3)), whole[[5, 2]])
    assert not torch.allclose(prompt_noise(8, [0], (2, 3, 3)), whole[:1])
    assert not torch.allclose(whole[0], whole[1])


def test_psnr_closed_form():
    a = torch.full((3, 3, 4, 4), 100, dtype=torch.uint8)
    b = a.clone()
    b[1] += 5
    b[2] -= 51
    expected = torch.tensor([PSNR_CAP, 20 * math.log10(255 / 5), 20 * math.log10(255 / 51)])
    torch.testing.assert_close(psnr(b, a), expected)


class ClassEps(nn.Module):
    """A tiny class-conditional epsilon network: conv(x) + a per-class offset."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.emb = nn.Embedding(10, 1)

    def forward(self, x, timestep, cond):
        return 0.5 * self.conv(x) + self.emb(cond).reshape(-1, 1, 1, 1) * (timestep / 1000).reshape(-1, 1, 1, 1)


@pytest.fixture(scope="module")
def denoiser():
    return Denoiser(ClassEps().eval(), "epsilon", VPSchedule.from_betas("linear", 1000, 1e-4, 0.02))


def builtin_methods(denoiser):
    teacher = denoiser_sampler(denoiser, TimeWindows(4), 4, "teacher DDIM-4")
    students = [denoiser_sampler(denoiser, TimeWindows(4), 4, "same as teacher"),
                denoiser_sampler(denoiser, TimeWindows(2), 2, "2-step"),
                denoiser_sampler(denoiser, TimeWindows(4), 2, "too few steps")]
    return teacher, students


def test_builtin_students_pair_with_the_teacher(denoiser, feature_file):
    teacher, students = builtin_methods(denoiser)
    labels = [i % 10 for i in range(12)]
    fid = FID(feature_file)
    ev = evaluate(teacher, students, labels, (1, 8, 8), seed=3, batch_size=5, fid=fid, sample_count=4,
                  progress=False)
    r = {x.name: x for x in ev.results}
    assert list(r) == ["teacher DDIM-4", "same as teacher", "2-step", "too few steps"]
    # the teacher's images are proreflow.sample from prompt_noise(seed, i): DDIM with 4 steps
    direct = sample(denoiser, prompt_noise(3, range(4), (1, 8, 8)), TimeWindows(4), 4, torch.tensor(labels[:4]))
    assert torch.equal(ev.samples["teacher DDIM-4"], to_uint8_rgb(((direct + 1) / 2).clamp(0, 1)))
    assert ev.samples["2-step"].shape == (4, 3, 8, 8)
    # same method, same noise: identical outputs
    same = r["same as teacher"]
    assert same.rmse_to_teacher == 0 and same.psnr_to_teacher == PSNR_CAP and abs(same.fid_to_teacher) < 1e-6
    other = r["2-step"]
    assert other.rmse_to_teacher > 0 and other.psnr_to_teacher < PSNR_CAP and other.fid_to_teacher > 1e-6
    assert r["teacher DDIM-4"].rmse_to_teacher is None and r["teacher DDIM-4"].fid_to_teacher is None
    assert "cannot cover 4 windows" in r["too few steps"].skipped and r["too few steps"].fid_to_teacher is None
    assert all(x.fid is None and x.clip_score is None for x in ev.results)  # no reference images, no CLIP
    assert NO_CLIP_MESSAGE in ev.notes
    # results do not depend on the batch size
    again = evaluate(teacher, students[1:2], labels, (1, 8, 8), seed=3, batch_size=12, fid=fid, progress=False)
    assert again.results[1].rmse_to_teacher == pytest.approx(other.rmse_to_teacher, rel=1e-6)
    assert again.results[1].fid_to_teacher == pytest.approx(other.fid_to_teacher, rel=1e-6)


def test_fid_against_reference_and_report(denoiser, feature_file, tmp_path):
    teacher, students = builtin_methods(denoiser)
    fid = FID(feature_file)
    labels = list(range(10))
    teacher_stats = fid.statistics([teacher.generate(prompt_noise(0, range(10), (1, 8, 8)), labels)])
    ev = evaluate(teacher, students[1:2], labels, (1, 8, 8), fid=fid, reference=teacher_stats, progress=False)
    assert abs(ev.results[0].fid) < 1e-6  # the teacher against statistics of its own images
    assert ev.results[1].fid == pytest.approx(ev.results[1].fid_to_teacher, rel=1e-9)
    paths = write_report(ev, tmp_path / "out", {"teacher": "ddim", "seed": 0})
    payload = json.loads(paths["json"].read_text())
    assert [r["name"] for r in payload["results"]] == ["teacher DDIM-4", "2-step"]
    assert payload["settings"]["seed"] == 0 and NO_CLIP_MESSAGE in payload["notes"]
    table = paths["markdown"].read_text()
    assert "| method | steps | FID ↓ | CLIP ↑ |" in table and "| 2-step | 2 |" in table
    grid = Image.open(paths["grids"] / "all.png")
    assert grid.width > 2 * 128 and sorted(p.name for p in paths["grids"].iterdir())[:2] == [
        "all.png", "prompt_000.png"]


def test_pipelines_teacher_ddim_vs_exported_student(teacher_dir, student_dir, feature_file, clip_dir):
    sd_teacher = load_teacher(teacher_dir)
    teacher_pipe = sd_teacher.pipe
    student_pipe, _ = load_student_pipeline(student_dir)
    assert type(student_pipe.scheduler).__name__ == "ProReflowScheduler"
    side = teacher_pipe.unet.config.sample_size
    shape = sd_teacher.latent_shape(sd_teacher.resolution)
    assert shape == (4, side, side)
    teacher = ddim_sampler(teacher_pipe, 4, 3.0)
    students = [pipeline_sampler(student_pipe, n, 3.0, f"student {n}-step") for n in (1, 2)]
    students.append(ddim_sampler(teacher_pipe, 4, 3.0, name="teacher again"))
    students.append(ddim_sampler(student_pipe, 1, 3.0, name="student DDIM-1"))
    prompts = ["a cat", "a dog", "a red cat", "two dogs", "a cat on a mat"]
    clip = ClipScorer.load(clip_dir)
    ev = evaluate(teacher, students, prompts, shape, seed=1, batch_size=2, fid=FID(feature_file), clip=clip,
                  sample_count=3, progress=False)
    r = {x.name: x for x in ev.results}
    # one step across the student's 2 windows is the student's own DDIM-1 (TimeWindows.for_steps)
    assert r["student 1-step"].skipped is None
    assert torch.equal(ev.samples["student 1-step"], ev.samples["student DDIM-1"])
    assert r["teacher again"].rmse_to_teacher == 0 and abs(r["teacher again"].fid_to_teacher) < 1e-6
    assert r["student 2-step"].rmse_to_teacher > 0 and r["student 2-step"].fid_to_teacher > 0
    for name in ("teacher DDIM-4", "student 2-step"):
        assert 0 <= r[name].clip_score <= 100 and r[name].images == 5 and r[name].seconds_per_image > 0
    # the teacher's images are the DDIM pipeline run on prompt_noise(seed, i) as latents
    assert type(teacher_pipe.scheduler).__name__ == "DDPMScheduler"  # the loaded pipeline is left as it was
    direct = teacher.generate(prompt_noise(1, [0, 1, 2], shape), prompts[:3])
    assert direct.shape == (3, 3, side * teacher_pipe.vae_scale_factor, side * teacher_pipe.vae_scale_factor)
    assert (ev.samples["teacher DDIM-4"].int() - to_uint8_rgb(direct).int()).abs().max() <= 1
    # CLIP score of the teacher equals scoring its images directly
    images = to_uint8_rgb(teacher.generate(prompt_noise(1, range(5), shape), prompts))
    assert r["teacher DDIM-4"].clip_score == pytest.approx(float(clip.score(images, prompts).mean()), abs=0.05)


def test_sdxl_pipelines(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from proreflow.sd import ProReflowScheduler
    from sd.tiny import save_tiny_sdxl

    sd = load_teacher(save_tiny_sdxl(tmp_path / "sdxl"))
    pipe = sd.pipe
    assert isinstance(pipe, StableDiffusionXLPipeline)
    student = StableDiffusionXLPipeline.from_pipe(
        pipe, scheduler=ProReflowScheduler.from_config(pipe.scheduler.config, num_windows=2))
    student.set_progress_bar_config(disable=True)
    ev = evaluate(ddim_sampler(pipe, 4, 3.0), [pipeline_sampler(student, 2, 3.0, "student 2-step")],
                  ["a cat", "a dog", "red"], sd.latent_shape(sd.resolution), batch_size=2, progress=False)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert ev.samples["student 2-step"].shape == (3, 3, side, side)
    assert 0 < ev.results[1].rmse_to_teacher < 1 and ev.results[1].images == 3


def test_a_failing_teacher_is_not_skipped(denoiser):
    def broken(noise, prompts):
        raise ValueError("teacher is broken")

    with pytest.raises(ValueError, match="teacher is broken"):
        evaluate(PromptSampler("teacher", 4, broken), [], [0, 1], (1, 8, 8), progress=False)
    teacher, _ = builtin_methods(denoiser)
    with pytest.raises(ValueError, match="names must be unique"):
        evaluate(teacher, [teacher], [0, 1], (1, 8, 8), progress=False)


def test_teacher_ddim_is_proreflows_ddim(teacher_dir):
    """The baseline is DDIM with trailing integer timesteps, no clipping, last step to alphas_cumprod[0]:
    ``proreflow.sample`` with ``TimeWindows(n)`` and n steps, the same timesteps ``t * T - 1``. Images in
    [0, 1] agree to float32 rounding (measured on the tiny teacher at guidance 3: 3.3e-7 at 1 step, 3.0e-7 at
    4, where ``t * (T - 1)`` missed by 1.35e-4 at 4 steps); the
    pipeline's own DDIM settings (leading, clip_sample from the DDPM config) miss by 9.3e-2 at 4 steps."""
    from diffusers import DDIMScheduler

    from proreflow import Denoiser, TimeWindows, sample
    from proreflow.sd.pipeline import unet_network

    sd = load_teacher(teacher_dir)
    prompts, shape = ["a cat", "a dog"], sd.latent_shape(sd.resolution)
    noise = prompt_noise(0, [0, 1], shape)
    denoiser = Denoiser(unet_network(sd.unet), sd.prediction_type, sd.schedule)
    for steps in (1, 4):
        want = (sd.decode_latents(sample(denoiser, noise, TimeWindows(steps), steps, sd.encode_prompts(prompts),
                                         sd.null_cond(), 3.0)) + 1) / 2
        got = ddim_sampler(sd.pipe, steps, 3.0).generate(noise, prompts)
        print(f"{steps} steps: max_gap {(got - want).abs().max():.2e}")
        assert (got - want).abs().max() < 3e-6, steps
    own = type(sd.pipe).from_pipe(sd.pipe, scheduler=DDIMScheduler.from_config(sd.pipe.scheduler.config))
    own.set_progress_bar_config(disable=True)
    assert (pipeline_sampler(own, 4, 3.0, "own DDIM").generate(noise, prompts) - want).abs().max() > 1e-2


class LabelJudge:
    """Reads the class an image shows off its mean pixel (class c: value 20 c); features: the pixel mean."""

    name = "label judge"

    def __init__(self, reference: torch.Tensor) -> None:
        self.reference = self.features(reference)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.float().mean(dim=(1, 2, 3))
        return torch.stack([mean, mean ** 2 / 100], dim=1)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float().mean(dim=(1, 2, 3)) / 20).round().long()


def test_judge_gives_prompt_accuracy_and_fd_to_the_reference():
    """True answers: a method that draws each prompt's class is 100 % accurate and has FD 0 to real images of
    those classes; one that always draws class 0 is right on exactly the prompts of class 0."""
    labels = [i % 5 for i in range(20)]

    def drawing(constant: int | None):
        def generate(noise, prompts):
            return torch.stack([torch.full((3, 4, 4), 20.0 * (c if constant is None else constant) / 255)
                                for c in prompts])
        return generate

    real = torch.stack([torch.full((3, 4, 4), 20 * c, dtype=torch.uint8) for c in labels])
    judge = LabelJudge(real)
    ev = evaluate(PromptSampler("right", 1, drawing(None)), [PromptSampler("zeros", 1, drawing(0))], labels,
                  (1, 2, 2), judge=judge, labels=labels, batch_size=6, progress=False)
    r = {x.name: x for x in ev.results}
    assert r["right"].accuracy == 1.0 and r["right"].fd == pytest.approx(0, abs=1e-6)
    assert r["zeros"].accuracy == labels.count(0) / len(labels) and r["zeros"].fd > 1
    with pytest.raises(ValueError, match="labels"):
        evaluate(PromptSampler("right", 1, drawing(None)), [], labels, (1, 2, 2), judge=judge, labels=labels[:3],
                 progress=False)
