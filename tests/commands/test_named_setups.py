"""The table of named setups behind ``proreflow train``'s ``setup:`` section."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from proreflow.builtin import DATASETS
from proreflow.builtin.teacher import builtin_setup
from proreflow.commands import named_setups as setups
from proreflow.commands.named_setups import build_setup, get_setup_builder
from proreflow.schedules import VPSchedule
from proreflow.training import DistillationSetup

HERE = __name__  # this module's import name, for builders named by import path


def make_setup(n: int = 64, conditional: bool = True) -> DistillationSetup:
    """A setup of ``n`` 2D points with class labels (None when not ``conditional``)."""
    labels = torch.arange(n) % 2
    dataset = TensorDataset(torch.randn(n, 2), labels) if conditional else [(x, None) for x in torch.randn(n, 2)]
    return DistillationSetup(nn.Linear(2, 2), "epsilon", VPSchedule.from_betas("scaled_linear"), dataset,
                             uncond=torch.tensor([2]) if conditional else None)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(setups.FAMILIES, "test-mixture", setups.Family(f"{HERE}:make_setup", "", "", False))


def test_build_a_registered_setup_with_arguments(registered):
    setup = build_setup({"name": "test-mixture", "n": 16, "conditional": False})
    assert isinstance(setup, DistillationSetup) and len(setup.dataset) == 16 and setup.uncond is None


def test_build_from_an_import_path():
    setup = build_setup({"name": f"{HERE}:make_setup", "n": 8})
    assert len(setup.dataset) == 8


def test_clear_errors(registered, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown setup 'nope'; known: .*test-mixture"):
        build_setup({"name": "nope"})
    with pytest.raises(ValueError, match="the setup section needs a name"):
        build_setup({"n": 3})
    with pytest.raises(ValueError, match=r"setup.size: 'test-mixture' takes no key 'size'; valid keys: "):
        build_setup({"name": "test-mixture", "size": 3})
    with pytest.raises(ValueError, match=f"cannot import '{HERE}:nothing'"):
        get_setup_builder(f"{HERE}:nothing")
    monkeypatch.setitem(setups.FAMILIES, "not-a-setup", setups.Family("builtins:int", "", "", False))
    with pytest.raises(TypeError, match="returned int, not a DistillationSetup"):
        build_setup({"name": "not-a-setup"})


def test_every_builtin_dataset_is_a_setup():
    for name in DATASETS:
        builder = get_setup_builder(name)
        assert isinstance(builder, functools.partial) and builder.func is builtin_setup and builder.args == (name,)


def test_an_import_path_needs_trust(monkeypatch):
    monkeypatch.delenv("PROREFLOW_TRUST_SETUP_CODE")
    with pytest.raises(ValueError, match=r"^setup.name: '.*:make_setup' is an import path: .*--trust-setup-code"):
        build_setup({"name": f"{HERE}:make_setup", "n": 8})
    assert len(build_setup({"name": f"{HERE}:make_setup", "n": 8}, trust=True).dataset) == 8
    monkeypatch.setenv("PROREFLOW_TRUST_SETUP_CODE", "0")
    with pytest.raises(ValueError, match="--trust-setup-code"):
        get_setup_builder(f"{HERE}:make_setup")


@pytest.mark.parametrize("key, value, expected", [
    ("center_crop", "maybe", "expected true or false, got 'maybe'"),
    ("resolution", True, "expected an integer or null, got True"),
    ("resolution", 32.5, "expected an integer or null, got 32.5"),
    ("data", ["a", 3], "expected a text or a list of texts or null, got ['a', 3]"),
    ("prompt_guidance", "high", "expected a number, got 'high'"),
])
def test_setup_values_of_the_wrong_type_are_refused_before_anything_builds(key, value, expected):
    """The builder's annotations are the types of its keys: a YAML string where a boolean belongs would be
    truthy, and True an integer, without this check."""
    from proreflow.commands.named_setups import check_setup_spec

    with pytest.raises(ValueError, match=re.escape(f"setup.{key}: {expected}")):
        check_setup_spec({"name": "stable-diffusion", "teacher": "t", key: value})
    check_setup_spec({"name": "stable-diffusion", "teacher": "t", "resolution": 32, "prompt_guidance": 4,
                      "data": ["a", "b"], "center_crop": False})  # an int is a number


def test_a_choice_annotated_as_literal_is_checked_before_anything_is_built():
    """setup.lora_targets is Literal["attention", "unet"] on the Stable Diffusion builder: another value is refused by
    the config check (nothing imported beyond the builder, no teacher loaded), naming the choices."""
    from proreflow.commands.named_setups import check_setup_spec

    spec = {"name": "stable-diffusion", "teacher": "absent", "data": "absent"}
    check_setup_spec({**spec, "lora_targets": "unet"})
    with pytest.raises(ValueError, match="setup.lora_targets: expected one of attention, unet, got 'convs'"):
        check_setup_spec({**spec, "lora_targets": "convs"})
