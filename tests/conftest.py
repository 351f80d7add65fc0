import os
from pathlib import Path

import pytest
import torch

# The test networks are tiny: one intra-op thread is fastest, and it keeps results independent
# of the machine's core count.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def trusted_setup_code(monkeypatch):
    """The tests name their toy setups by import path (``setup: {name: helpers.engine_toys:make_setup}``): code
    of this repository, trusted as ``--trust-setup-code`` would (PROREFLOW_TRUST_SETUP_CODE=1, which the
    command-line subprocesses they start inherit). A test of the refusal deletes the variable."""
    monkeypatch.setenv("PROREFLOW_TRUST_SETUP_CODE", "1")


TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def helpers_on_the_path_of_subprocesses(monkeypatch):
    """The command-line subprocesses the tests start import ``helpers`` (their toy setups) as the tests do:
    ``tests/`` on their PYTHONPATH, as pytest's ``pythonpath`` puts it on this process's path."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p))
