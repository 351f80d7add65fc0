"""Teacher start points and the trajectory cache: one solve from noise serves every stage of 8 -> 4 -> 2."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from helpers.engine_toys import CrashingMixture, Mixture, make_setup, tiny_recipe
from safetensors.torch import load_file

from proreflow.solvers import solve
from proreflow.training import StageRunner, train
from proreflow.training import target_cache as cache_module
from proreflow.training.batches import sample_randomness
from proreflow.training.recipes import RecipeError, load_recipe
from proreflow.training.step import teacher_start_batch, trajectory_cache
from proreflow.windows import TimeWindows

ITEMS = 16
BASE = {"batch_size": 8, "steps": 3, "guidance": 2.0, "lr": 1e-2, "start_points": "teacher"}
STAGES = [{"windows": 8, "solver_steps": 2}, {"windows": 4, "solver_steps": 4}, {"windows": 2, "solver_steps": 8}]
GUIDED = 2  # a guided evaluation is two network evaluations (conditional and unconditional halves)


def recipe(defaults: dict | None = None, **changes) -> dict:
    return tiny_recipe(defaults={**BASE, **(defaults or {})}, stages=[dict(s) for s in STAGES], **changes)


class CountingMLP(torch.nn.Module):
    """The toy teacher, counting the samples its forward sees (independent of the engine's counter)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x, timestep, cond):
        self.calls += x.shape[0]
        return self.inner(x, timestep, cond)


def counted_setup(n: int = ITEMS):
    setup = make_setup(n)
    setup.teacher_model = CountingMLP(setup.teacher_model)
    setup.make_student = None
    return setup


def online_evals(raw: dict, index: int, items: int = ITEMS) -> int:
    """Teacher evaluations of stage ``index`` without the cache, in closed form: each sample solves from noise
    to the end of its window, ``last edge * steps per fine window`` solver steps (guided: 2 evaluations each)."""
    rec = load_recipe(raw)
    stage = rec.stages[index]
    edges = TimeWindows(rec.trajectory_windows(index))
    steps = stage.solver_steps * stage.windows // edges.count
    total = 0
    for step in range(stage.steps):
        positions = range(step * stage.batch_size, (step + 1) * stage.batch_size)
        t, _, _ = sample_randomness(positions, rec.seed, index, (2,), torch.float64)
        _, last = TimeWindows(stage.windows).edge_indices(t, edges)
        total += int(last.sum()) * steps * GUIDED
    return total


def assert_close_weights(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol)


def test_cached_trajectories_give_the_targets_and_weights_of_the_online_solve_and_cost_one_solve(tmp_path):
    """8 -> 4 -> 2 with teacher start points: the cached run trains on the same targets as the online one
    (float64, to rounding: the two solve a sample in batches of other sizes, and a network's float sums
    depend on the batch), so the weights agree to rounding; the cache costs one trajectory per item,
    items x 8 windows x 2 steps, all in stage 1, counted by the engine and at the network alike."""
    online_setup, cached_setup = counted_setup(), counted_setup()
    online = train(recipe(), online_setup, tmp_path / "online", progress=False)
    cached = train(recipe(target_cache=str(tmp_path / "cache")), cached_setup, tmp_path / "cached", progress=False)
    expected_online = [online_evals(recipe(), i) for i in range(3)]
    assert [s.teacher_evals for s in online.stages] == expected_online
    assert online_setup.teacher_model.calls == sum(expected_online)
    build = ITEMS * 8 * 2 * GUIDED
    assert [s.teacher_evals for s in cached.stages] == [build, 0, 0]
    assert cached_setup.teacher_model.calls == build < sum(expected_online)
    assert_close_weights(load_file(tmp_path / "cached/student.safetensors"),
                         load_file(tmp_path / "online/student.safetensors"), atol=1e-11)
    for (s1, l1), (s2, l2) in zip(cached.history, online.history, strict=True):
        assert s1 == s2 and abs(l1 - l2) < 1e-10
    # the targets themselves, stage by stage, for the first steps' micro-batches
    data = Mixture(ITEMS)
    for index in range(3):
        runners = [StageRunner(recipe(**extra), make_setup(ITEMS), index)
                   for extra in ({}, {"target_cache": str(tmp_path / "cache")})]
        for step in range(3):
            batches = []
            for runner in runners:
                ctx = runner.context
                positions = ctx.plan.positions(step, 0)
                items = ctx.plan.indices(positions)
                x0, cond = data.x[items], data.labels[items]
                t, _, _ = sample_randomness(positions, 0, index, (2,), torch.float64)
                batches.append(teacher_start_batch(ctx, positions, x0, cond, ctx.uncond, t))
            for name in ("x_t", "t", "v_target", "t_start", "t_end"):
                torch.testing.assert_close(getattr(batches[0], name), getattr(batches[1], name), rtol=0, atol=1e-13)


def test_pairs_read_for_coarser_stages_are_the_teachers_solve_with_the_merged_steps(tmp_path):
    """A 4- and a 2-window stage read (x_start, x_end) from the 8-edge trajectories; x_end equals the guided
    teacher's DDIM solve over the window from that x_start with 2 x 2 = 4 and 4 x 2 = 8 steps (float64)."""
    raw = recipe(target_cache=str(tmp_path / "cache"))
    for index, merged in ((1, 2), (2, 4)):
        with StageRunner(raw, make_setup(ITEMS), index) as runner:
            ctx = runner.context
            indices = list(range(ITEMS))
            data = Mixture(ITEMS)
            windows = TimeWindows(ctx.stage.windows)
            t = torch.linspace(1.0, 0.01, ITEMS, dtype=torch.float64)
            ctx.trajectories = trajectory_cache(ctx)
            first, last = windows.edge_indices(t, TimeWindows(8))
            x_start, x_end = ctx.trajectories.pairs(indices, first, last, data.labels)
            t_start, t_end = windows.bounds(t)
            direct = solve(ctx.teacher.denoiser, x_start, t_start, t_end, 2 * merged, data.labels,
                           ctx.uncond, ctx.teacher.guidance)
            assert ctx.teacher.steps == 2 * merged
            torch.testing.assert_close(x_end, direct, rtol=0, atol=1e-12)


def test_proreflow_ii_teacher_evaluations_with_and_without_the_trajectory_cache(tmp_path):
    """The proreflow-ii preset (8 -> 4 -> 2, 4 / 8 / 16 DDIM steps per window: one 32-step grid), with teacher
    start points, counted at the network: without the cache every sample solves from noise to its window's
    end; with it each item's trajectory is solved once (32 evaluations) and read by all three stages."""
    overrides = ["stages.*.start_points=teacher", "stages.*.steps=4", "defaults.batch_size=8", "checkpoint_every=0",
                 "defaults.warmup_steps=0"]
    raw = load_recipe("proreflow-ii", overrides).to_dict()
    assert [s["solver_steps"] for s in raw["stages"]] == [4, 8, 16]
    online_setup, cached_setup = counted_setup(), counted_setup()
    online = train(raw, online_setup, tmp_path / "online", progress=False)
    cached = train({**raw, "target_cache": str(tmp_path / "cache")}, cached_setup, tmp_path / "cached",
                   progress=False)
    samples = 3 * 4 * 8
    expected = [online_evals(raw, i) // GUIDED for i in range(3)]  # the preset is unguided
    assert online_setup.teacher_model.calls == sum(s.teacher_evals for s in online.stages) == sum(expected)
    assert cached_setup.teacher_model.calls == sum(s.teacher_evals for s in cached.stages) == ITEMS * 32
    assert [s.teacher_evals for s in cached.stages][1:] == [0, 0]
    # per training sample: with the cache 32 * items / samples, without it the mean last edge x 4
    assert cached_setup.teacher_model.calls / samples < online_setup.teacher_model.calls / samples


def test_a_changed_setting_builds_another_trajectory_folder_and_a_tampered_key_is_refused(tmp_path):
    cache = tmp_path / "cache"
    first = train(recipe(target_cache=str(cache)), make_setup(ITEMS), tmp_path / "a", progress=False)
    (folder,) = cache.iterdir()
    assert first.stages[0].teacher_evals == ITEMS * 8 * 2 * GUIDED
    again = train(recipe(target_cache=str(cache)), make_setup(ITEMS), tmp_path / "b", progress=False)
    assert [s.teacher_evals for s in again.stages] == [0, 0, 0]
    folders = {folder.name}
    for i, (changes, setup) in enumerate((({"seed": 1}, make_setup(ITEMS)),
                                          ({"defaults": {"guidance": 3.0}}, make_setup(ITEMS)),
                                          ({}, make_setup(ITEMS, pretrained=False)),
                                          ({}, make_setup(ITEMS + 1)))):
        run = train(recipe(target_cache=str(cache), **changes), setup, tmp_path / f"c{i}", progress=False)
        assert run.stages[0].teacher_evals == (ITEMS + (i == 3)) * 8 * 2 * GUIDED  # solved anew, not read
        now = {p.name for p in cache.iterdir()}
        assert len(now) == len(folders) + 1 and folders < now
        folders = now
    key_file = folder / "key.json"
    key_file.write_text(json.dumps({**json.loads(key_file.read_text()), "seed": 99}))
    with pytest.raises(ValueError, match=f"{key_file}.*other settings.*delete"):
        train(recipe(target_cache=str(cache)), make_setup(ITEMS), tmp_path / "d", progress=False)


def test_a_dataset_whose_conditions_changed_is_refused(tmp_path):
    cache = tmp_path / "cache"
    train(recipe(target_cache=str(cache)), make_setup(ITEMS), tmp_path / "a", progress=False)
    setup = make_setup(ITEMS)
    setup.dataset.labels = (setup.dataset.labels + 1) % 3  # same items, other conditions
    with pytest.raises(ValueError, match=r"trajectory of dataset item \d+ was solved for another condition.*delete"):
        train(recipe(target_cache=str(cache)), setup, tmp_path / "b", progress=False)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_or_missing_shard_is_solved_again_and_the_run_is_unchanged(tmp_path, monkeypatch, caplog, damage):
    """Two shards of 8 items; one is damaged (a flipped byte in its data, cut short) or missing (a run killed
    while building): the next run solves that shard's 8 trajectories again, and nothing else, and trains the
    same weights as a run on the intact cache."""
    monkeypatch.setattr(cache_module, "SHARD_SIZE", 8)
    cache = tmp_path / "cache"
    intact = train(recipe(target_cache=str(cache)), make_setup(ITEMS), tmp_path / "a", progress=False)
    assert intact.stages[0].teacher_evals == ITEMS * 8 * 2 * GUIDED
    shard = next(cache.glob("trajectories-*/shard-00001.safetensors"))
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[-20] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-64])
    else:
        shard.unlink()
    with caplog.at_level(logging.WARNING, logger="proreflow.training"):
        again = train(recipe(target_cache=str(cache)), make_setup(ITEMS), tmp_path / "b", progress=False)
    assert [s.teacher_evals for s in again.stages] == [8 * 8 * 2 * GUIDED, 0, 0]
    assert (damage == "delete") != any("solving its trajectories again" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(load_file(tmp_path / "b/student.safetensors"),
                               load_file(tmp_path / "a/student.safetensors"), rtol=0, atol=0)


def test_a_run_resumed_after_a_crash_reads_the_trajectories_and_equals_the_uninterrupted_one(tmp_path):
    def raw(cache):
        return recipe(target_cache=str(tmp_path / cache), checkpoint_every=1, keep_checkpoints=0)

    straight = train(raw("a"), make_setup(ITEMS), tmp_path / "straight", progress=False)
    setup = make_setup(ITEMS)
    setup.dataset = CrashingMixture(50, ITEMS)  # stage 1: 24 reads to train, 1 + 16 to build; crash in stage 2
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(raw("b"), setup, out, progress=False)
    resumed = train(raw("b"), make_setup(ITEMS), out, resume=True, progress=False)
    assert resumed.history == straight.history
    assert [s.teacher_evals for s in resumed.stages] == [s.teacher_evals for s in straight.stages]
    torch.testing.assert_close(load_file(out / "student.safetensors"),
                               load_file(tmp_path / "straight/student.safetensors"), rtol=0, atol=0)


def test_a_run_killed_while_building_solves_only_the_missing_shards_when_resumed(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "SHARD_SIZE", 8)
    raw = recipe(target_cache=str(tmp_path / "cache"))
    straight = train(raw, make_setup(ITEMS), tmp_path / "straight", progress=False)
    (tmp_path / "straight").rename(tmp_path / "kept")
    for shard in (tmp_path / "cache").glob("trajectories-*/shard-*"):
        shard.unlink()
    setup = make_setup(ITEMS)
    setup.dataset = CrashingMixture(8 + 1 + 8 + 1, ITEMS)  # step 1, the shape read, shard 0, shard 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(raw, setup, tmp_path / "killed", progress=False)
    assert [p.name for p in (tmp_path / "cache").glob("trajectories-*/shard-*")] == ["shard-00000.safetensors"]
    resumed = train(raw, make_setup(ITEMS), tmp_path / "killed", resume=True, progress=False)
    assert [s.teacher_evals for s in resumed.stages] == [8 * 8 * 2 * GUIDED, 0, 0]
    assert resumed.history == straight.history


@pytest.mark.parametrize("change, message", [
    ({"teacher": "previous", "solver_steps": None}, "stages.1.start_points: teacher start points lie on the original"),
    ({"solver": "dpmpp_2m"}, "stages.1.solver: DPM-Solver++(2M) carries history"),
    ({"cond_dropout": 0.1}, "stages.1.cond_dropout: teacher start points follow each item's conditioned trajectory"),
])
def test_teacher_start_points_are_refused_where_the_trajectory_is_not_the_target(change, message):
    raw = recipe()
    raw["stages"][1].update(change)
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(raw)


def test_stages_with_another_grid_read_their_own_trajectory():
    """K is the most windows among the teacher-start stages on the same grid (windows x solver_steps)."""
    raw = recipe()
    raw["stages"][2]["solver_steps"] = 4  # 2 x 4 = 8 steps over [0, 1], not 32
    rec = load_recipe(raw)
    assert [rec.trajectory_windows(i) for i in range(3)] == [8, 8, 2]


def test_the_target_cache_key_follows_the_keys_declared_as_targets(tmp_path):
    """A key declared ``targets`` (recipes.TARGET_KEYS) moves the target cache to another folder; the loss and
    the optimiser's keys do not (runs that differ in them share the teacher's solves)."""
    from proreflow.training.recipes import TARGET_KEYS
    from proreflow.training.step import target_cache

    def folder(**defaults):
        raw = tiny_recipe(target_cache=str(tmp_path), defaults={**tiny_recipe()["defaults"], **defaults})
        with StageRunner(raw, make_setup(16), 0) as runner:
            return target_cache(runner.context).folder

    base = folder()
    assert {"windows", "solver_steps", "guidance", "batch_size", "seed"} <= set(TARGET_KEYS)
    for key, value in (("solver_steps", 4), ("batch_size", 4), ("cond_dropout", 0.5)):
        assert folder(**{key: value}) != base, key
    for key, value in (("lr", 5e-3), ("alpha", 3.0), ("loss_weighting", "window"), ("ema_decay", 0.5),
                       ("guidance", 3.0)):  # an unguided teacher (the toy's stage 1 under cfg_sync / scale 1 baked)
        cfg_sync = {"guidance_mode": "cfg_sync", "cond_dropout": 0.1}
        assert folder(**{key: value, **cfg_sync}) == folder(**cfg_sync), key
    assert folder(guidance=3.0) != base  # baked: the teacher's solve is guided by it
