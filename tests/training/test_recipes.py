"""Recipes: presets, YAML configs, overrides and clear errors for impossible recipes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from proreflow.training.recipes import (
    PRESET_DIR,
    PRESETS,
    STAGE_KEYS,
    Recipe,
    RecipeError,
    Stage,
    describe_keys,
    load_config,
    load_recipe,
    read_config,
)


def windows(recipe: Recipe) -> list[int]:
    return [s.windows for s in recipe.stages]


def test_presets_have_the_published_structure():
    expected = {"reflow": [1], "perflow": [4], "proreflow-i": [8, 4], "proreflow-ii": [8, 4, 2],
                "proreflow-1step": [8, 4, 2, 1], "proreflow-any-step": [8, 4, 4]}
    assert set(PRESETS) == set(expected)
    for name, counts in expected.items():
        recipe = load_recipe(name)
        assert recipe.name == name and windows(recipe) == counts
        # every stage against the original teacher: the quality benchmark (docs/research/2026-quality-study.md,
        # issue 5) found the previous-student teacher compounds the students' errors
        assert all(s.teacher == "original" for s in recipe.stages)
    assert all(s.alpha == 0 for n in ("reflow", "perflow") for s in load_recipe(n).stages)  # MSE
    assert all(s.alpha > 0 for n in ("proreflow-i", "proreflow-ii") for s in load_recipe(n).stages)
    assert load_recipe("perflow").stages[0].solver_steps == 8  # PeRFlow: 8 DDIM steps per window
    # the original teacher spends 32 DDIM steps over [0, 1] in every stage: 32 // windows per window
    assert [s.solver_steps for s in load_recipe("proreflow-1step").stages] == [4, 8, 16, 32]
    # a previous-student teacher crosses a merged window with one Euler step per old window
    previous = load_recipe("proreflow-1step", ["stages.1.teacher=previous", "stages.2.teacher=previous"])
    assert [s.solver_steps for s in previous.stages[1:3]] == [2, 2]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_files_are_recipes_for_any_setup(name):
    recipe, setup = load_config(PRESET_DIR / f"{name}.yaml")
    assert recipe == load_recipe(name) and recipe.name == name
    assert setup is None  # a preset names no setup: `--config NAME setup.name=...`


def test_round_trip_and_yaml(tmp_path):
    recipe = load_recipe("proreflow-ii", ["seed=7", "stages.1.guidance=2.5"])
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe
    assert load_recipe(recipe) == recipe


def test_defaults_fill_stages_and_stage_keys_win():
    recipe = Recipe.from_dict({"defaults": {"lr": 1e-3, "steps": 5},
                               "stages": [{"windows": 4}, {"windows": 2, "lr": 2e-4}]})
    assert [s.lr for s in recipe.stages] == [1e-3, 2e-4]
    assert [s.steps for s in recipe.stages] == [5, 5]
    assert recipe.stages[0].batch_size == Stage(windows=1).batch_size  # dataclass default


def test_overrides():
    base = {"defaults": {"lr": 1e-3}, "stages": [{"windows": 4}, {"windows": 2, "lr": 2e-4}]}
    r = load_recipe(base, ["seed=3", "stages.0.alpha=0.5", "mixed_precision=bf16"])
    assert r.seed == 3 and r.stages[0].alpha == 0.5 and r.stages[1].alpha == 1.0 and r.mixed_precision == "bf16"
    r = load_recipe(base, ["defaults.lr=5e-5"])  # YAML 1.1 reads 5e-5 as a string: numbers accept it
    assert [s.lr for s in r.stages] == [5e-5, 2e-4]
    r = load_recipe(base, ["stages.*.lr=5e-5"])
    assert [s.lr for s in r.stages] == [5e-5, 5e-5]
    r = load_recipe(base, ["stages=[{windows: 2, steps: 3}]"])
    assert windows(r) == [2] and r.stages[0].steps == 3
    recipe, setup = load_config(base, ["setup.name=digits", "setup.size=8"])
    assert setup == {"name": "digits", "size": 8}
    assert read_config("perflow", ["stages.0.steps=10"])["stages"][0]["steps"] == 10
    assert PRESETS["perflow"]["stages"][0]["steps"] == 2000  # presets are not modified


@pytest.mark.parametrize("overrides, match", [
    (["bogus=1"], r"unknown key 'bogus'.*valid keys: stages, name"),
    (["lr=1e-4"], r"'lr' is a stage key: use defaults.lr or stages.\*.lr"),
    (["stages.1.lrate=1"], r"unknown key stages.1.'lrate'.*valid keys: windows, steps"),
    (["defaults.foo=1"], r"unknown key defaults.'foo'"),
    (["stages.1.windows=3"], r"stages.1.windows: 3 windows cannot follow 8"),
    (["stages.2.windows=8"], r"stages.2.windows: 8 windows cannot follow 4"),
    (["stages.0.steps=0"], r"stages.0.steps: must be at least 1, got 0"),
    (["stages.1.solver_steps=0"], r"stages.1.solver_steps: must be at least 1"),
    (["stages.1.teacher=previous", "stages.1.solver_steps=3"],
     r"stages.1.solver_steps: 3 Euler steps cannot cross 2 old windows"),
    (["stages.0.steps=many"], r"stages.0.steps: expected an integer, got 'many'"),
    (["stages.0.steps=10.5"], r"stages.0.steps: expected an integer"),
    (["stages.0.lr=fast"], r"stages.0.lr: expected a number, got 'fast'"),
    (["stages.0.lr=-1"], r"stages.0.lr: must be at least 0, got -1"),
    (["stages.0.ema_decay=1.0"], r"stages.0.ema_decay: must be in \[0, 1\)"),
    (["tensorboard=3"], r"tensorboard: the key is now report_to"),
    (["seed=true"], r"seed: expected an integer, got True"),
    (["name=3"], r"name: expected a string"),
    (["mixed_precision=fp8"], r"mixed_precision: 'fp8' is not one of no, fp16, bf16"),
    (["mixed_precision=yes"], r"mixed_precision: expected one of no, fp16, bf16, got True, which YAML read as a "
                              r"boolean"),
    (["mixed_precision="], r"mixed_precision: expected a value, got nothing"),
    (["name=on"], r"name: expected a string, got True, which YAML read as a boolean .* quote the value, e.g. "
                  r"name: 'yes' in a file or name=\"'yes'\" as an override"),
    (["name=2025"], r"name: expected a string, got 2025, which YAML read as a number; quote the value, e.g. "
                    r"name: '2025'"),
    (["description=2025-01-31"], r"description: expected a string, got datetime.date\(2025, 1, 31\), which YAML "
                                 r"read as a date"),
    (["name=[a, b]"], r"name: expected a string, got \['a', 'b'\]$"),
    (["stages.0.teacher=no"], r"stages.0.teacher: expected one of original, previous, got False"),
    (["defaults.guidance_mode=1.5"], r"stages.0.guidance_mode: expected one of baked, cfg_sync, got 1.5, which "
                                     r"YAML read as a number"),
    (["stages.0.teacher=student"], r"stages.0.teacher: 'student' is not one of original, previous"),
    (["stages.0.teacher=previous"], r"stages.0.teacher: the first stage has no previous student"),
    (["stages.*.guidance_mode=cfg_sync"], r"stages.0.cond_dropout: 'cfg_sync' trains .* set cond_dropout > 0"),
    (["stages.1.teacher=previous", "stages.1.guidance_mode=cfg_sync", "stages.1.cond_dropout=0.1"],
     r"stages.1.guidance_mode: 'cfg_sync' differs"),
    (["stages.0.loss_space=noise"], r"stages.0.loss_space: 'noise' is not one of velocity, epsilon, x0, geometric"),
    (["defaults.loss_weighting=snr"], r"stages.0.loss_weighting: 'snr' is not one of none, min_snr, window"),
    (["stages.*.snr_gamma=0"], r"stages.0.snr_gamma: must be > 0"),
    (["stages=[]"], r"stages: a recipe needs a non-empty list"),
    (["stages.0={steps: 3}"], r"stages.0: missing key 'windows'"),
    (["stages.5.lr=1"], r"override stages.5.lr: '5' is not an index of a list of 3"),
    (["seed"], r"override 'seed' is not key=value"),
])
def test_clear_errors_name_the_key(overrides, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe("proreflow-ii", overrides)


@pytest.mark.parametrize("text", ["no", "No", "NO", "off", "false", "'no'"])
def test_mixed_precision_no_as_yaml_reads_it(text, tmp_path):
    """YAML 1.1 reads an unquoted no / off / false as the boolean False: for mixed_precision it means 'no'."""
    assert load_recipe("perflow", [f"mixed_precision={text}"]).mixed_precision == "no"
    path = tmp_path / "r.yaml"
    path.write_text(f"mixed_precision: {text}\nstages: [{{windows: 2}}]\n")
    recipe = load_recipe(path)
    assert recipe.mixed_precision == "no"
    path.write_text(recipe.to_yaml())  # written back quoted: 'no'
    assert "mixed_precision: 'no'" in path.read_text() and load_recipe(path) == recipe
    assert load_recipe("perflow", ["mixed_precision=bf16", f"mixed_precision={text}"]).mixed_precision == "no"


def test_bad_sources(tmp_path):
    with pytest.raises(RecipeError, match="neither a preset .* nor a YAML file"):
        load_recipe("no-such-recipe")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(path)


def test_guidance_rules():
    cfg = load_recipe("proreflow-i", ["stages.*.guidance_mode=cfg_sync", "stages.*.cond_dropout=0.1",
                                      "stages.*.guidance=4"])
    assert [s.teacher_guidance() for s in cfg.stages] == [1.0, 1.0]  # teacher at scale 1
    assert cfg.sample_guidance == 4.0  # the student is sampled with CFG
    baked = load_recipe("proreflow-i", ["stages.*.guidance=4"])
    assert [s.teacher_guidance() for s in baked.stages] == [4.0, 4.0]  # the original teacher, guided
    assert baked.sample_guidance == 1.0
    previous = load_recipe("proreflow-i", ["stages.*.guidance=4", "stages.1.teacher=previous"])
    assert [s.teacher_guidance() for s in previous.stages] == [4.0, 1.0]  # guidance is baked in once


def test_every_key_is_documented():
    text = describe_keys()
    for f in dataclasses.fields(Recipe) + dataclasses.fields(Stage):
        assert f"  {f.name} " in text and f.metadata.get("help")
    assert set(STAGE_KEYS) == {f.name for f in dataclasses.fields(Stage)}


def test_the_window_solver_is_a_checked_stage_key_and_defaults_to_ddim():
    assert all(s.solver == "ddim" for s in load_recipe("proreflow-ii").stages)
    assert load_recipe("proreflow-ii", ["stages.0.solver=dpmpp_2m"]).stages[0].solver == "dpmpp_2m"
    with pytest.raises(RecipeError, match=r"stages.0.solver: 'rk4' is not one of ddim, dpmpp_2m, heun"):
        load_recipe("proreflow-ii", ["stages.0.solver=rk4"])
    with pytest.raises(RecipeError, match=r"stages.1.solver: a previous-stage teacher is piecewise straight"):
        load_recipe("proreflow-ii", ["stages.1.teacher=previous", "stages.1.solver=heun"])


def test_split_steps_gives_each_stage_its_share_of_the_budget():
    from proreflow.training.recipes import budget_overrides, split_steps

    assert split_steps(800, [1, 1, 1]) == [266, 266, 266]  # even: total // stages, as the benchmark always split
    assert split_steps(800, [750, 750, 1500]) == [200, 200, 400]
    assert split_steps(3, [1, 1, 2]) == [1, 1, 1]  # every stage at least one step
    assert budget_overrides(load_recipe("proreflow-ii"), 1200) == ["stages.0.steps=300", "stages.1.steps=300",
                                                                   "stages.2.steps=600"]
    with pytest.raises(RecipeError, match="cannot be split"):
        split_steps(0, [1, 2])


def test_the_any_step_preset_is_proreflow_ii_with_a_last_stage_of_4_2_and_1_windows():
    """proreflow-any-step differs from proreflow-ii only where its description says (the benchmark measures
    both presets as shipped: benchmarks/quality.py SHIPPED)."""
    preset = load_recipe("proreflow-any-step")
    assert preset.step_counts == (8, 4, 2, 1) and preset.stages[-1].extra_windows == [2, 1]
    built = load_recipe("proreflow-ii", ["stages.2.windows=4", "stages.2.extra_windows=[2, 1]",
                                         "step_conditioning=true", "stages.*.alpha=10.0"])
    unnamed = {"name": "", "description": ""}
    assert {**built.to_dict(), **unnamed} == {**preset.to_dict(), **unnamed}


def test_the_key_reference_is_generated_from_the_declarations():
    """docs/recipe-keys.md is key_reference() (regenerate it when a key changes); every key is declared in a group
    of the reference, and the tables the checks use derive from the declarations."""

    from proreflow.training import recipes

    doc = Path(__file__).resolve().parents[2] / "docs" / "recipe-keys.md"
    assert doc.read_text() == recipes.key_reference()
    for name, f in recipes.KEY_FIELDS.items():
        assert f.metadata["group"] in recipes.GROUPS, name
        assert f"`{name}`" in doc.read_text()
    assert recipes._LIMITS["windows"] == (1, recipes.MAX_WINDOWS) and recipes._CHOICES["solver"] == recipes.SOLVERS
    assert set(recipes.WEIGHTLESS_KEYS) >= {"name", "log_every", "target_cache", "num_workers"}
    assert not set(recipes.WEIGHTLESS_KEYS) & {"seed", "lr", "windows", "mixed_precision", "batch_size"}

