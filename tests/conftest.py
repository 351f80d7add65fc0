import pytest
import torch

# The test networks are tiny: one intra-op thread is fastest, and it keeps results independent
# of the machine's core count.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def trusted_setup_code(monkeypatch):
    """The tests name their toy setups by import path (``setup: {name: engine_toys:make_setup}``): code
    of this repository, trusted as ``--trust-setup-code`` would (PROREFLOW_TRUST_SETUP_CODE=1, which the
    command-line subprocesses they start inherit). A test of the refusal deletes the variable."""
    monkeypatch.setenv("PROREFLOW_TRUST_SETUP_CODE", "1")
