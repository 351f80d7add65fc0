"""The progressive runner on CPU: learning, stage hand-over, resume, non-finite losses, files."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.engine_toys import ADAPTER, MLP, Adapted, Mixture, make_adapted_setup, make_setup, tiny_recipe
from safetensors.torch import load_file

from proreflow.training import NonFiniteLossError, latest_checkpoint, load_student, read_student_info, train


def weights(path) -> dict:
    return load_file(str(path))


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol)


class Faulty(Mixture):
    """The mixture, raising (``crash_at``) or returning NaN data (``nan_calls``) at given item reads."""

    def __init__(self, crash_at: int | None = None, nan_calls: range = range(0)):
        super().__init__()
        self.calls, self.crash_at, self.nan_calls = 0, crash_at, nan_calls

    def __getitem__(self, i):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("simulated crash")
        x, label = super().__getitem__(i)
        return (x * float("nan") if self.calls in self.nan_calls else x), label


def test_training_reduces_the_loss(tmp_path):
    """A student from scratch learns the reflow targets of a 2-window stage (plain MSE)."""
    setup = make_setup(from_scratch_seed=5)
    recipe = tiny_recipe(from_scratch=True, stages=[{"windows": 2, "steps": 150, "alpha": 0.0}],
                         defaults={"lr": 1e-2, "batch_size": 32, "solver_steps": 2, "grad_clip": 0.0})
    result = train(recipe, setup, tmp_path, progress=False)
    losses = [loss for _, loss in result.history]
    assert len(losses) == 150
    first, last = sum(losses[:10]) / 10, sum(losses[-30:]) / 30
    assert last < 0.3 * first, (first, last)


def test_stage_two_starts_from_stage_one_ema(tmp_path):
    stage1 = {"windows": 4, "steps": 12, "lr": 1e-2}
    recipe = tiny_recipe(stages=[stage1, {"windows": 2, "teacher": "previous", "steps": 1, "lr": 0.0}])
    train(recipe, make_setup(), tmp_path / "a", progress=False)
    ema1 = weights(tmp_path / "a/stage-1-4w/ema.safetensors")
    # stage 2 made no update (lr = 0): its result is its starting point, stage 1's EMA
    assert_same(weights(tmp_path / "a/stage-2-2w/ema.safetensors"), ema1)
    # ... which differs from stage 1's raw weights (the same run with ema_decay = 0) and the teacher
    raw = tiny_recipe(stages=[{**stage1, "ema_decay": 0.0}])
    train(raw, make_setup(), tmp_path / "b", progress=False)
    raw1 = weights(tmp_path / "b/stage-1-4w/ema.safetensors")
    teacher = make_setup().teacher_model.state_dict()
    for key in ema1:
        assert (ema1[key] - raw1[key]).abs().max() > 1e-6
        assert (ema1[key] - teacher[key]).abs().max() > 1e-6


def test_resume_matches_an_uninterrupted_run(tmp_path):
    """Crash mid-stage 1 and mid-stage 2, resume each time: the same weights, history and counts."""
    recipe = tiny_recipe(checkpoint_every=4, keep_checkpoints=0,
                         defaults={"lr": 1e-2, "batch_size": 8, "grad_accum": 2, "steps": 10, "ema_decay": 0.8,
                                   "warmup_steps": 3, "solver_steps": 2, "cond_dropout": 0.25})
    setup = make_setup()
    straight = train(recipe, setup, tmp_path / "straight", progress=False)

    out = tmp_path / "resumed"
    setup.dataset = Faulty(crash_at=5 * 8 + 1)  # in stage 1, step 6 (last checkpoint: step 4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(recipe, setup, out, progress=False)
    assert latest_checkpoint(out).name == "step-00000004"
    setup.dataset = Faulty(crash_at=6 * 8 + 6 * 8 + 1)  # resumes at step 4; crashes in stage 2, step 7
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(recipe, setup, out, resume=True, progress=False)
    assert latest_checkpoint(out).name == "step-00000014"
    assert (latest_checkpoint(out) / "ema.safetensors").is_file()
    setup.dataset = Faulty()
    resumed = train(recipe, setup, out, resume=True, progress=False)

    assert_same(weights(out / "student.safetensors"), weights(tmp_path / "straight/student.safetensors"))
    assert_same(weights(out / "stage-1-4w/ema.safetensors"), weights(tmp_path / "straight/stage-1-4w/ema.safetensors"))
    assert resumed.history == straight.history
    assert [s.teacher_evals for s in resumed.stages] == [s.teacher_evals for s in straight.stages]
    assert [s.final_loss for s in resumed.stages] == [s.final_loss for s in straight.stages]


def test_lora_like_student_keeps_only_adapter_ema_and_resumes_exactly(tmp_path):
    """A frozen base with a trainable adapter: mid-stage checkpoints hold the adapter's EMA only,
    stage results are the full EMA student (base = the teacher's), and crashes mid-stage and at a
    stage boundary (hand-over from the stage-1 result on disk) resume to the uninterrupted run."""
    recipe = tiny_recipe(checkpoint_every=3, keep_checkpoints=0,
                         defaults={"lr": 1e-2, "batch_size": 8, "steps": 6, "ema_decay": 0.8, "warmup_steps": 0,
                                   "solver_steps": 2, "cond_dropout": 0.25})
    straight = train(recipe, make_adapted_setup(), tmp_path / "straight", progress=False)

    out, setup = tmp_path / "resumed", make_adapted_setup()
    setup.dataset = Faulty(crash_at=4 * 8 + 1)  # stage 1, step 5 (last checkpoint: step 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(recipe, setup, out, progress=False)
    mid = latest_checkpoint(out)
    assert mid.name == "step-00000003"
    assert set(weights(mid / "ema.safetensors")) == set(ADAPTER)  # not the frozen base
    assert weights(mid / "student.safetensors").keys() == Adapted().state_dict().keys()
    setup.dataset = Faulty(crash_at=3 * 8 + 8 + 1)  # resumes at stage 1 step 3; crashes in stage 2, step 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(recipe, setup, out, resume=True, progress=False)
    assert latest_checkpoint(out).name == "step-00000006"  # the end of stage 1
    setup.dataset = Faulty()
    resumed = train(recipe, setup, out, resume=True, progress=False)

    for name in ("stage-1-4w/ema.safetensors", "stage-2-2w/ema.safetensors", "student.safetensors"):
        assert_same(weights(out / name), weights(tmp_path / "straight" / name))
    assert resumed.history == straight.history
    teacher, final = Adapted().state_dict(), weights(out / "student.safetensors")
    assert final.keys() == teacher.keys()
    for key in teacher:
        if key in ADAPTER:
            assert (final[key] - teacher[key]).abs().max() > 1e-6
        else:
            torch.testing.assert_close(final[key], teacher[key], rtol=0, atol=0)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    base = {"lr": 1e-2, "batch_size": 8, "steps": 5, "solver_steps": 2, "cond_dropout": 0.25}
    train(tiny_recipe(defaults=base), make_setup(), tmp_path / "one", progress=False)
    train(tiny_recipe(defaults={**base, "grad_accum": 4}), make_setup(), tmp_path / "four", progress=False)
    assert_same(weights(tmp_path / "one/student.safetensors"), weights(tmp_path / "four/student.safetensors"),
                atol=1e-10)


def test_teacher_evaluations_are_counted(tmp_path):
    """Stage 1: 5 steps x 8 samples x 3 DDIM steps x 2 (guided); stage 2: 5 x 8 x 2 Euler steps."""
    recipe = tiny_recipe(defaults={"batch_size": 8, "steps": 5, "guidance": 2.0},
                         stages=[{"windows": 4, "solver_steps": 3}, {"windows": 2, "teacher": "previous"}])
    result = train(recipe, make_setup(), tmp_path, progress=False)
    assert [s.teacher_evals for s in result.stages] == [5 * 8 * 3 * 2, 5 * 8 * 2]
    assert [s.samples for s in result.stages] == [40, 40]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["teacher_evals"] for s in summary] == [240, 80] and summary[1]["windows"] == 2


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    setup = make_setup()
    setup.dataset = Faulty(nan_calls=range(2 * 8 + 1, 3 * 8 + 1))  # every sample of step 3
    recipe = tiny_recipe(max_nonfinite=2, stages=[{"windows": 4, "steps": 6}])
    result = train(recipe, setup, tmp_path, progress=False)
    assert result.stages[0].skipped == 1 and result.stages[0].steps == 6
    assert [step for step, _ in result.history] == [1, 2, 4, 5, 6]
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "student.safetensors").values())


def test_too_many_nonfinite_steps_stop_the_run_with_the_last_good_checkpoint(tmp_path):
    setup = make_setup()
    setup.dataset = Faulty(nan_calls=range(4 * 8 + 1, 10**6))  # from step 5 on
    recipe = tiny_recipe(max_nonfinite=3, checkpoint_every=3, stages=[{"windows": 4, "steps": 20}])
    with pytest.raises(NonFiniteLossError, match=r"stage 1, step 7: 3 optimiser steps had a non-finite loss or gradient"
                                                  r" \(max_nonfinite=3\).*step-00000006"):
        train(recipe, setup, tmp_path, progress=False)
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.name == "step-00000006"  # step 6 was skipped, its checkpoint holds step-4 weights
    student = weights(checkpoint / "student.safetensors")
    assert all(torch.isfinite(v).all() for v in student.values())
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["step"] == 6 and meta["counters"]["skipped"] == 2
    # the data is repaired: resuming from the last checkpoint finishes the run
    setup.dataset = Faulty()
    result = train(recipe, setup, tmp_path, resume=True, progress=False)
    assert result.stages[0].skipped == 2 and result.stages[0].steps == 20


def test_outputs_checkpoints_and_load_student(tmp_path):
    recipe = tiny_recipe(checkpoint_every=2, keep_checkpoints=2)
    setup = make_setup()
    result = train(recipe, setup, tmp_path, progress=False)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-00000010", "step-00000012"]
    mid = tmp_path / "checkpoints/step-00000010"  # stage 2, step 4
    assert sorted(p.name for p in mid.iterdir()) == ["checksums.json", "ema.safetensors", "meta.json", "rng-0.pt",
                                                     "state.pt", "student.safetensors"]
    state = torch.load(mid / "state.pt", weights_only=True)
    assert state["history"].shape == (10, 2) and state["optimizer"]["state"]
    info = read_student_info(tmp_path)
    assert info["windows"] == 2 and info["prediction_type"] == "epsilon" and info["info"] == {"dataset": "mixture"}

    device = next(result.module.parameters()).device
    student, windows = load_student(tmp_path, make_setup(), device=device)
    assert windows.count == 2 == result.windows.count
    x, t = torch.randn(5, 2, dtype=torch.float64, device=device), torch.full((5,), 0.7, dtype=torch.float64)
    label = torch.zeros(5, dtype=torch.long, device=device)
    torch.testing.assert_close(student.predict(x, t, label), result.student.predict(x, t, label), rtol=0, atol=0)
    first, first_windows = load_student(tmp_path, make_setup(), stage=1)
    assert first_windows.count == 4
    with pytest.raises(FileNotFoundError, match="no result for stage 3"):
        load_student(tmp_path, make_setup(), stage=3)

    with pytest.raises(FileExistsError, match="already holds checkpoints.*--resume"):
        train(recipe, setup, tmp_path, progress=False)
    again = train(recipe, setup, tmp_path, resume=True, progress=False)  # finished: nothing left to train
    assert again.history == result.history and again.stages == result.stages


def test_conditions_must_fit_guidance_and_dropout(tmp_path):
    setup = make_setup(conditional=False)
    with pytest.raises(ValueError, match="stages.0.guidance: baking guidance 2.0 .* needs conditioned data"):
        train(tiny_recipe(stages=[{"windows": 2, "guidance": 2.0}]), setup, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="stages.0.cond_dropout: condition dropout needs"):
        train(tiny_recipe(stages=[{"windows": 2, "cond_dropout": 0.1}]), setup, tmp_path / "b", progress=False)
    result = train(tiny_recipe(stages=[{"windows": 2}]), setup, tmp_path / "c", progress=False)
    assert result.stages[0].steps == 6


def test_a_flow_teacher_refuses_vp_only_loss_settings_before_training(tmp_path):
    import dataclasses

    from proreflow.flow import FlowSchedule

    flow = dataclasses.replace(make_setup(), prediction_type="flow_velocity", schedule=FlowSchedule())
    for key, value, fix in (("loss_weighting", "start_epsilon", "none"), ("loss_space", "epsilon", "velocity")):
        with pytest.raises(ValueError, match=rf"stages.1.{key}: '{value}' needs a VP diffusion teacher, .* "
                                             rf"set {key}: {fix}$"):
            train(tiny_recipe(stages=[{"windows": 4}, {"windows": 2, key: value}]), flow, tmp_path / key,
                  progress=False)
        assert not (tmp_path / key).exists() or not any((tmp_path / key).rglob("*.safetensors"))


def test_a_zero_terminal_snr_teacher_refuses_an_epsilon_output_and_start_epsilon(tmp_path):
    """abar(1) = 0: an epsilon output has no x0 at t = 1 (every step would be non-finite), and c(1, s) is
    infinite, so start_epsilon would weigh the first window's squared error by 0; a v_prediction teacher trains."""
    import dataclasses

    from proreflow.losses import time_weights
    from proreflow.schedules import VPSchedule

    zsnr = VPSchedule.from_betas(zero_terminal_snr=True)
    one, half = torch.ones(2, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
    assert (time_weights("start_epsilon", half + 0.25, one, half, torch.ones(2, 3), zsnr) == 0).all()
    setup = dataclasses.replace(make_setup(), schedule=zsnr)
    with pytest.raises(ValueError, match=r"an epsilon teacher cannot start at pure noise on a zero-terminal-SNR"):
        train(tiny_recipe(stages=[{"windows": 2}]), setup, tmp_path / "eps", progress=False)
    setup = dataclasses.replace(setup, prediction_type="v_prediction")
    with pytest.raises(ValueError, match=r"stages.0.loss_weighting: 'start_epsilon' .* zero-terminal-SNR .* "
                                         r"set loss_weighting: none$"):
        train(tiny_recipe(stages=[{"windows": 2, "loss_weighting": "start_epsilon"}]), setup, tmp_path / "a",
              progress=False)
    result = train(tiny_recipe(stages=[{"windows": 2}]), setup, tmp_path / "b", progress=False)
    assert result.stages[0].steps == 6 and result.stages[0].skipped == 0


class UNetLike(torch.nn.Module):
    """A diffusers-style network: ``forward(sample, timestep, encoder_hidden_states, return_dict)``."""

    def __init__(self):
        super().__init__()
        self.net = MLP(0)
        self.proj = torch.nn.Linear(4, 32).double()

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        h = self.net.inp(torch.cat([sample, timestep[:, None].to(sample.dtype) / 1000], dim=1))
        out = self.net.out(h + self.proj(encoder_hidden_states))
        return (out,) if not return_dict else {"sample": out}


class TextMixture(Mixture):
    def __getitem__(self, i):
        x, label = super().__getitem__(i)
        return x, {"encoder_hidden_states": torch.nn.functional.one_hot(label, 4).double()}


@pytest.mark.parametrize("mode, evals_per_step", [("baked", 8 * 2 * 2), ("cfg_sync", 8 * 2)])
def test_dict_conditions_through_a_diffusers_adapter(tmp_path, mode, evals_per_step):
    from proreflow.teachers import diffusers_network
    from proreflow.training import DistillationSetup

    setup = DistillationSetup(UNetLike(), "epsilon", make_setup().schedule, TextMixture(),
                              uncond={"encoder_hidden_states": torch.zeros(1, 4, dtype=torch.float64)},
                              adapter=diffusers_network)
    recipe = tiny_recipe(stages=[{"windows": 2, "steps": 3}],
                         defaults={"batch_size": 8, "solver_steps": 2, "guidance": 3.0, "guidance_mode": mode,
                                   "cond_dropout": 0.5 if mode == "cfg_sync" else 0.0})
    result = train(recipe, setup, tmp_path, progress=False)
    assert result.stages[0].teacher_evals == 3 * evals_per_step
    assert result.guidance == (3.0 if mode == "cfg_sync" else 1.0) == read_student_info(tmp_path)["guidance"]
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.history)


class SDXLLike(torch.nn.Module):
    """An SDXL-style network (``added_cond_kwargs``) that records the conditions of every call."""

    def __init__(self):
        super().__init__()
        self.net = MLP(0)
        self.proj = torch.nn.Linear(4 + 4 + 6, 32).double()
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True):
        text, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        self.calls.append((encoder_hidden_states.clone(), text.clone(), time_ids.clone()))
        h = self.net.inp(torch.cat([sample, timestep[:, None].to(sample.dtype) / 1000], dim=1))
        return (self.net.out(h + self.proj(torch.cat([encoder_hidden_states, text, time_ids / 64], dim=1))),)


class SDXLMixture(Mixture):
    """Text states from the label; ``time_ids = (index, label, 0, 0, 16, 16)``: each sample's own."""

    def __getitem__(self, i):
        x, label = super().__getitem__(i)
        text = torch.nn.functional.one_hot(label, 4).double()
        time_ids = torch.tensor([i, int(label), 0, 0, 16, 16], dtype=torch.float64)
        return x, {"encoder_hidden_states": text, "added_cond_kwargs": {"text_embeds": 2 * text, "time_ids": time_ids}}


@pytest.mark.parametrize("keep_on_dropout", [("added_cond_kwargs.time_ids",), ()])
def test_condition_dropout_keeps_the_named_leaves(tmp_path, keep_on_dropout):
    """SDXL: a dropped condition (and the unconditional branch of guidance) has the null text states
    but the sample's own time_ids when the setup keeps them; all of the null condition otherwise."""
    from proreflow.teachers import diffusers_network
    from proreflow.training import DistillationSetup
    from proreflow.training.batches import BatchPlan, sample_randomness

    null_ids = torch.tensor([[-1.0, -1, 0, 0, 16, 16]], dtype=torch.float64)
    uncond = {"encoder_hidden_states": torch.zeros(1, 4, dtype=torch.float64),
              "added_cond_kwargs": {"text_embeds": torch.zeros(1, 4, dtype=torch.float64), "time_ids": null_ids}}
    setup = DistillationSetup(SDXLLike(), "epsilon", make_setup().schedule, SDXLMixture(), uncond=uncond,
                              adapter=diffusers_network, keep_on_dropout=keep_on_dropout)
    recipe = tiny_recipe(stages=[{"windows": 2, "steps": 3}],
                         defaults={"batch_size": 8, "solver_steps": 1, "guidance": 3.0, "cond_dropout": 0.5})
    result = train(recipe, setup, tmp_path, progress=False)

    plan, data = BatchPlan(64, 0, 0, 8, 1), SDXLMixture()
    student_calls, teacher_calls = result.module.calls, setup.teacher_model.calls
    assert len(student_calls) == 3 and len(teacher_calls) == 3  # one call a step; the teacher's is guided
    dropped = 0
    for step, (states, text, time_ids) in enumerate(student_calls):
        positions = plan.positions(step, 0)
        _, keep, _ = sample_randomness(positions, 0, 0, (2,), torch.float64, 0.5)
        for row, index in enumerate(plan.indices(positions)):
            own = data[index][1]
            if keep[row]:
                assert torch.equal(states[row], own["encoder_hidden_states"])
                assert torch.equal(time_ids[row], own["added_cond_kwargs"]["time_ids"])
            else:
                dropped += 1
                assert not states[row].any() and not text[row].any()  # the null text states
                expected = own["added_cond_kwargs"]["time_ids"] if keep_on_dropout else null_ids[0]
                assert torch.equal(time_ids[row], expected)
        t_states, t_text, t_ids = teacher_calls[step]  # [unconditional half, conditional half]
        assert torch.equal(t_states[8:], states) and torch.equal(t_ids[8:], time_ids)
        assert not t_states[:8].any() and not t_text[:8].any()
        assert torch.equal(t_ids[:8], time_ids if keep_on_dropout else null_ids.expand(8, -1))
    assert 0 < dropped < 24


def test_tensorboard_and_progress(tmp_path, capsys):
    train(tiny_recipe(report_to="tensorboard", stages=[{"windows": 2, "steps": 3}]), make_setup(), tmp_path)
    assert list((tmp_path / "tensorboard" / "tiny").glob("events.out.tfevents.*"))
    err = capsys.readouterr()
    assert "stage 1/1 (2 windows, teacher: original): 3 steps" in err.out + err.err


def test_bf16_mixed_precision_runs(tmp_path):
    setup = make_setup()
    setup.teacher_model.float()
    setup.dataset.x = setup.dataset.x.float()
    result = train(tiny_recipe(mixed_precision="bf16", stages=[{"windows": 2, "steps": 3}]), setup, tmp_path,
                   progress=False)
    assert setup.teacher_model.inp.weight.dtype == torch.bfloat16  # frozen teacher cast
    assert result.module.inp.weight.dtype == torch.float32  # the student trains float32 weights
    assert len(result.history) == 3 and all(torch.isfinite(torch.tensor(loss)) for _, loss in result.history)


def test_frozen_teacher_parameters_stay_frozen_in_the_student(tmp_path):
    """The student copy keeps the teacher's requires_grad flags (e.g. a LoRA student): only those train."""
    setup = make_setup()
    setup.teacher_model.inp.requires_grad_(False)
    result = train(tiny_recipe(stages=[{"windows": 2, "steps": 4}]), setup, tmp_path, progress=False)
    teacher = setup.teacher_model
    assert not teacher.inp.weight.requires_grad and teacher.out[1].weight.requires_grad  # flags untouched
    torch.testing.assert_close(result.module.inp.weight, teacher.inp.weight, rtol=0, atol=0)
    assert (result.module.out[1].weight - teacher.out[1].weight).abs().max() > 1e-6


def test_a_teacher_frozen_throughout_gives_a_fully_trainable_student(tmp_path):
    setup = make_setup()
    setup.teacher_model.requires_grad_(False)
    result = train(tiny_recipe(stages=[{"windows": 2, "steps": 2}]), setup, tmp_path, progress=False)
    trained = result.module.state_dict()
    assert all((trained[k] - v).abs().max() > 0 for k, v in setup.teacher_model.state_dict().items())


def test_target_cache_reproduces_the_uncached_run_and_is_shared_by_a_loss_study(tmp_path):
    """Cached original-teacher batches give the same weights, history and counted teacher evaluations;
    a second run that changes only the loss reuses them (no new cache files) and equals its uncached twin."""
    base = {"batch_size": 8, "steps": 5, "guidance": 2.0, "cond_dropout": 0.25, "solver_steps": 2, "lr": 1e-2}
    stages = [{"windows": 4}, {"windows": 2}]
    cache = tmp_path / "cache"
    plain = train(tiny_recipe(defaults=base, stages=stages), make_setup(), tmp_path / "plain", progress=False)
    first = train(tiny_recipe(defaults=base, stages=stages, target_cache=str(cache)), make_setup(), tmp_path / "a",
                  progress=False)
    files = sorted(cache.rglob("*.pt"))
    assert len(files) == 2 * 5  # 2 stages x 5 steps x 1 micro-batch
    assert_same(weights(tmp_path / "a/student.safetensors"), weights(tmp_path / "plain/student.safetensors"))
    assert first.history == plain.history
    assert [s.teacher_evals for s in first.stages] == [s.teacher_evals for s in plain.stages] == [160, 160]
    eps = {**base, "loss_space": "epsilon"}
    again = train(tiny_recipe(defaults=eps, stages=stages, target_cache=str(cache)), make_setup(), tmp_path / "b",
                  progress=False)
    twin = train(tiny_recipe(defaults=eps, stages=stages), make_setup(), tmp_path / "c", progress=False)
    assert sorted(cache.rglob("*.pt")) == files
    assert_same(weights(tmp_path / "b/student.safetensors"), weights(tmp_path / "c/student.safetensors"))
    assert again.history == twin.history != plain.history


def test_resume_with_the_target_cache_moved_matches_the_uncached_run(tmp_path):
    """A cache changes no weight, so a resume may move it (or drop it) without allow_recipe_change: the run
    that crashed with its cache in one folder and resumed with it in another equals the uncached run."""
    base = {"batch_size": 8, "steps": 6, "solver_steps": 2, "lr": 1e-2}
    recipe = tiny_recipe(defaults=base, stages=[{"windows": 2}], checkpoint_every=2, keep_checkpoints=0)
    plain = train(recipe, make_setup(), tmp_path / "plain", progress=False)
    setup = make_setup()
    setup.dataset = Faulty(crash_at=3 * 8 + 1)  # step 4 (last checkpoint: step 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train({**recipe, "target_cache": str(tmp_path / "a")}, setup, tmp_path / "run", progress=False)
    setup.dataset = Faulty()
    resumed = train({**recipe, "target_cache": str(tmp_path / "b")}, setup, tmp_path / "run", resume=True,
                    progress=False)
    assert_same(weights(tmp_path / "run/student.safetensors"), weights(tmp_path / "plain/student.safetensors"))
    assert resumed.history == plain.history


def test_target_cache_refuses_other_data_of_the_same_size(tmp_path):
    """The cache key names the dataset by its length: a dataset of the same length with other items must be
    refused on its first cached batch, not trained on the first dataset's targets."""
    recipe = tiny_recipe(target_cache=str(tmp_path / "cache"), stages=[{"windows": 2, "steps": 2}])
    train(recipe, make_setup(), tmp_path / "a", progress=False)
    other = make_setup()
    other.dataset.x = other.dataset.x + 0.5
    with pytest.raises(ValueError, match="holds targets of other data of the same size"):
        train(recipe, other, tmp_path / "b", progress=False)
    train(recipe, make_setup(), tmp_path / "c", progress=False)  # the same data still reads its targets


def test_target_cache_keys_on_the_schedule(tmp_path):
    """The same teacher weights on another schedule make other targets: a run on it fills its own folder and
    trains as it does without a cache, never on the first schedule's targets."""
    import dataclasses

    from proreflow.schedules import VPSchedule

    recipe = tiny_recipe(target_cache=str(tmp_path / "cache"), stages=[{"windows": 2, "steps": 2}])
    train(recipe, make_setup(), tmp_path / "a", progress=False)
    linear = dataclasses.replace(make_setup(), schedule=VPSchedule.from_betas("linear", beta_start=1e-4, beta_end=0.02))
    cached = train(recipe, linear, tmp_path / "b", progress=False)
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2
    plain = train({**recipe, "target_cache": ""}, linear, tmp_path / "c", progress=False)
    assert cached.history == plain.history


def test_an_extra_teacher_teaches_the_smaller_counts_and_its_evaluations_count(tmp_path):
    """extra_teacher: previous beside the original teacher. Each 2-window sample costs the original teacher its
    solver_steps (3) evaluations, each 1-window sample the previous 4-window student one Euler step per its window
    (4): the stage's count is the closed form over the counts the samples drew (guidance 1: one evaluation per
    step)."""
    from proreflow.training.batches import window_counts

    stages = [{"windows": 4, "steps": 2},
              {"windows": 2, "extra_windows": [1], "extra_teacher": "previous", "solver_steps": 3, "steps": 3}]
    recipe = tiny_recipe(stages=stages)
    train(recipe, make_setup(), tmp_path, progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    counts = window_counts(range(3 * 8), recipe["seed"], 1, (2, 1))
    assert 0 < (counts == 1).sum() < len(counts)
    assert summary[1]["teacher_evals"] == int(3 * (counts == 2).sum() + 4 * (counts == 1).sum())
