"""Test-wide settings."""

import pytest
import torch
from torch.distributions import Distribution

# The tests train tiny networks: one thread avoids synchronisation overhead that dominates at
# these sizes on a 2-core machine (and keeps timings stable when other processes run).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts with one torch thread (a test that sets more gets its own setting back
    afterwards): on two shared cores oversubscription slows the small networks 5-10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _distribution_validation_is_restored():
    """torch.compile switches torch.distributions' argument validation off for the whole
    process the first time it runs; restore it so that a test's outcome does not depend on
    whether a compiling test ran before it."""
    before = Distribution._validate_args
    yield
    Distribution.set_default_validate_args(before)
