"""Fixtures of the engine tests (helpers live in tests/helpers/engine_toys.py)."""

from __future__ import annotations

import pytest
from helpers.engine_toys import make_setup


@pytest.fixture
def setup():
    return make_setup()
