"""The registry of named setups behind ``proreflow train``'s ``setup:`` section."""

from __future__ import annotations

import pytest
from engine_toys import make_setup

from proreflow.training import SETUPS, DistillationSetup, build_setup, register_setup
from proreflow.training.setups import get_setup_builder


@pytest.fixture
def registered():
    register_setup("test-mixture", lambda n=64, conditional=True: make_setup(n, conditional))
    yield
    SETUPS.pop("test-mixture")


def test_build_a_registered_setup_with_arguments(registered):
    setup = build_setup({"name": "test-mixture", "n": 16, "conditional": False})
    assert isinstance(setup, DistillationSetup) and len(setup.dataset) == 16 and setup.uncond is None


def test_build_from_an_import_path():
    setup = build_setup({"name": "engine_toys:make_setup", "n": 8})
    assert len(setup.dataset) == 8


def test_clear_errors(registered):
    with pytest.raises(ValueError, match=r"unknown setup 'nope'; known: .*test-mixture"):
        build_setup({"name": "nope"})
    with pytest.raises(ValueError, match="the setup section needs a name"):
        build_setup({"n": 3})
    with pytest.raises(ValueError, match=r"setup.size: 'test-mixture' takes no key 'size'; valid keys: "):
        build_setup({"name": "test-mixture", "size": 3})
    with pytest.raises(ValueError, match="cannot import 'engine_toys:nothing'"):
        get_setup_builder("engine_toys:nothing")
    register_setup("not-a-setup", lambda: 3)
    try:
        with pytest.raises(TypeError, match="returned int, not a DistillationSetup"):
            build_setup({"name": "not-a-setup"})
    finally:
        SETUPS.pop("not-a-setup")
