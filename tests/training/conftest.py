"""Fixtures of the engine tests (helpers live in engine_toys.py)."""

from __future__ import annotations

import pytest
import torch
from engine_toys import make_setup


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread (and intra-op threads thrash on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def setup():
    return make_setup()
